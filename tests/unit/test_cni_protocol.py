"""CNI protocol tier (no root): the plugin run as libcni runs it, plus its pure parts.

Every call goes through the launcher written by install_cni, so these tests also cover the
``-IS`` shebang and the package lookup.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.cni import is_elf, plugin_fixture, run_plugin, write_subnet_env

import netagent.cni.install
from netagent.cni.conf import Config, host_veth_name
from netagent.cni.errors import CniError
from netagent.cni.fast import dumps, loads
from netagent.cni.install import CONFLIST_NAME, find_compiler, install_cni
from netagent.cni.skel import SUPPORTED_VERSIONS, Env, parse_cni_args, render_result
from netagent.cni.subnet import parse_subnet_env

plugin_exe = plugin_fixture()


def _conf(tmp: Path, version: str = "1.0.0", **extra: object) -> dict[str, object]:
    conf: dict[str, object] = {
        "cniVersion": version, "name": "protonet", "type": "netagent",
        "subnetFile": str(tmp / "subnet.env"), "dataDir": str(tmp / "ipam"),
        "ipMasq": False, "subnetFileWait": 0, "bridge": "naproto0",
    }
    conf.update(extra)
    return conf


# --------------------------------------------------------------------------- VERSION


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_version_echoes_request(plugin_exe: str, version: str) -> None:
    out = run_plugin(plugin_exe, "VERSION", {"cniVersion": version}, ifname="").ok()
    assert out == {"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS}


def test_version_without_stdin(plugin_exe: str) -> None:
    out = run_plugin(plugin_exe, "VERSION", None, ifname="").ok()
    assert "1.1.0" in out["supportedVersions"] and "0.4.0" in out["supportedVersions"]


# --------------------------------------------------------------------------- errors


def test_missing_command_is_code_4(plugin_exe: str, tmp_path: Path) -> None:
    call = run_plugin(plugin_exe, "", _conf(tmp_path))
    assert "CNI_COMMAND" in call.error(4)["msg"]


def test_unknown_command_is_code_4(plugin_exe: str, tmp_path: Path) -> None:
    assert "FOO" in run_plugin(plugin_exe, "FOO", _conf(tmp_path)).error(4)["msg"]


@pytest.mark.parametrize("stdin", ["{not json", "[1, 2]", "", "\"x\""])
def test_undecodable_config_is_code_6(plugin_exe: str, stdin: str) -> None:
    call = run_plugin(plugin_exe, "ADD", stdin, cid="c1", netns="/run/netns/x")
    err = call.error(6)
    assert err["cniVersion"] == "1.1.0"  # unknown request version: our latest


@pytest.mark.parametrize("version", ["0.1.0", "0.2.0", "2.0.0", None])
def test_unsupported_version_is_code_1(plugin_exe: str, tmp_path: Path,
                                        version: str | None) -> None:
    conf = _conf(tmp_path)
    if version is None:
        del conf["cniVersion"]
    else:
        conf["cniVersion"] = version
    err = run_plugin(plugin_exe, "ADD", conf, cid="c1", netns="/run/netns/x").error(1)
    assert "1.1.0" in err["details"]


@pytest.mark.parametrize("change", [
    {"name": ""}, {"name": "bad name"}, {"bridge": "a-bridge-name-too-long"},
    {"hairpinMode": "yes"}, {"mtu": 10}, {"ipam": []}, {"ipam": {"type": 3}},
    {"prevResult": "x"},
])
def test_invalid_config_is_code_7(plugin_exe: str, tmp_path: Path,
                                   change: dict[str, object]) -> None:
    conf = _conf(tmp_path, **change)
    err = run_plugin(plugin_exe, "ADD", conf, cid="c1", netns="/run/netns/x").error(7)
    assert err["cniVersion"] == "1.0.0"


@pytest.mark.parametrize("env,needle", [
    ({"cid": "", "netns": "/run/netns/x"}, "CNI_CONTAINERID"),
    ({"cid": "c1", "netns": ""}, "CNI_NETNS"),
    ({"cid": "c1", "netns": "/run/netns/x", "ifname": ""}, "CNI_IFNAME"),
    ({"cid": "-x y", "netns": "/run/netns/x"}, "containerID"),
    ({"cid": "c1", "netns": "/run/netns/x", "ifname": "a" * 16}, "too long"),
    ({"cid": "c1", "netns": "/run/netns/x", "ifname": "a/b"}, "invalid character"),
    ({"cid": "c1", "netns": "/run/netns/x", "args": "FOO=bar"}, "unknown args"),
    ({"cid": "c1", "netns": "/run/netns/x", "args": "novalue"}, "K=V"),
])
def test_invalid_env_is_code_4(plugin_exe: str, tmp_path: Path, env: dict[str, str],
                               needle: str) -> None:
    err = run_plugin(plugin_exe, "ADD", _conf(tmp_path), **env).error(4)
    assert needle in err["msg"], err


def test_add_without_subnet_env_is_code_11_and_names_the_file(plugin_exe: str,
                                                              tmp_path: Path) -> None:
    err = run_plugin(plugin_exe, "ADD", _conf(tmp_path), cid="c1",
                     netns="/run/netns/x").error(11)
    assert str(tmp_path / "subnet.env") in err["msg"]
    assert not (tmp_path / "ipam").exists()


def test_add_with_bad_netns_path_is_code_4(plugin_exe: str, tmp_path: Path) -> None:
    write_subnet_env(tmp_path / "subnet.env", "10.250.0.0/16", "10.250.3.1/24")
    for netns in (str(tmp_path / "nope"), str(tmp_path)):
        err = run_plugin(plugin_exe, "ADD", _conf(tmp_path), cid="c1", netns=netns).error(4)
        assert err["details"] == "CNI_NETNS"
    assert not any((tmp_path / "ipam").glob("10.*"))


def test_check_without_prev_result_is_code_7(plugin_exe: str, tmp_path: Path) -> None:
    write_subnet_env(tmp_path / "subnet.env", "10.250.0.0/16", "10.250.3.1/24")
    run_plugin(plugin_exe, "CHECK", _conf(tmp_path), cid="c1", netns="/run/netns/x").error(7)


def test_errors_never_leak_to_stdout_as_non_json(plugin_exe: str, tmp_path: Path) -> None:
    """An internal failure is still one JSON object on stdout; the traceback goes to stderr."""
    write_subnet_env(tmp_path / "subnet.env", "10.250.0.0/16", "10.250.3.1/24")
    (tmp_path / "ipam").write_text("a file where the IPAM directory should be")
    call = run_plugin(plugin_exe, "DEL", _conf(tmp_path), cid="c1")
    assert call.rc != 0 and isinstance(call.json, dict) and call.json["code"] in (5, 999), call


# --------------------------------------------------------------------------- DEL/GC/STATUS


def test_del_with_nothing_to_delete_succeeds_twice(plugin_exe: str, tmp_path: Path) -> None:
    for _ in range(2):
        call = run_plugin(plugin_exe, "DEL", _conf(tmp_path), cid="c1")  # no netns, no state
        assert call.rc == 0 and call.stdout == "", call


def test_del_accepts_ignore_unknown_args_and_prev_result(plugin_exe: str, tmp_path: Path) -> None:
    conf = _conf(tmp_path, prevResult={"cniVersion": "1.0.0", "ips": []},
                 capabilities={"portMappings": True}, runtimeConfig={"portMappings": []},
                 someKey="kept")
    call = run_plugin(plugin_exe, "DEL", conf, cid="c1", netns="/run/netns/gone",
                      args="IgnoreUnknown=1;K8S_POD_NAME=x;FOO=bar")
    assert call.rc == 0 and call.stdout == "", call


def test_status_is_code_50_until_subnet_env_exists(plugin_exe: str, tmp_path: Path) -> None:
    conf = _conf(tmp_path, "1.1.0")
    err = run_plugin(plugin_exe, "STATUS", conf, ifname="").error(50)
    assert "subnet.env" in err["msg"]
    write_subnet_env(tmp_path / "subnet.env", "10.250.0.0/16", "10.250.3.1/24")
    call = run_plugin(plugin_exe, "STATUS", conf, ifname="")
    assert call.rc == 0 and call.stdout == "", call


def test_gc_reads_either_attachment_key_and_prints_nothing(plugin_exe: str,
                                                           tmp_path: Path) -> None:
    for key in ("cni.dev/valid-attachments", "cni.dev/attachments"):
        conf = _conf(tmp_path, "1.1.0", **{key: [{"containerID": "c1", "ifname": "eth0"}]})
        call = run_plugin(plugin_exe, "GC", conf, ifname="")
        assert call.rc == 0 and call.stdout == "", call
    run_plugin(plugin_exe, "GC", _conf(tmp_path, "1.1.0"), ifname="").error(7)


def test_gc_releases_only_stale_reservations(plugin_exe: str, tmp_path: Path) -> None:
    ipam = tmp_path / "ipam"
    ipam.mkdir()
    (ipam / "10.250.3.2").write_bytes(b"keep\r\neth0")
    (ipam / "10.250.3.3").write_bytes(b"stale\r\neth0")
    (ipam / "10.250.3.4").write_bytes(b"keep\r\neth1")
    conf = _conf(tmp_path, "1.1.0", **{"cni.dev/valid-attachments": [
        {"containerID": "keep", "ifname": "eth0"}, {"containerID": "keep", "ifname": "eth1"}]})
    assert run_plugin(plugin_exe, "GC", conf, ifname="").rc == 0
    assert sorted(p.name for p in ipam.glob("10.*")) == ["10.250.3.2", "10.250.3.4"]


# --------------------------------------------------------------------------- pure parts


def test_subnet_env_parsing() -> None:
    sub = parse_subnet_env("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/24\n"
                           "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n")
    assert (sub.network_cidr, sub.subnet_cidr, sub.gateway_ip, sub.mtu, sub.ipmasq) == (
        "10.5.0.0/16", "10.5.72.0/24", "10.5.72.1", 1450, False)
    with pytest.raises(CniError) as e:
        parse_subnet_env("FLANNEL_NETWORK=10.5.0.0/16\n")
    assert "FLANNEL_SUBNET" in e.value.msg


def test_cni_args() -> None:
    assert parse_cni_args("IgnoreUnknown=1;IP=10.1.2.3;X=y")["IP"] == "10.1.2.3"
    with pytest.raises(CniError):
        parse_cni_args("X=y")


def test_render_result_per_version() -> None:
    ifaces = [{"name": "br"}, {"name": "veth"}, {"name": "eth0", "sandbox": "/n", "mtu": 1450}]
    ips = [{"address": "10.1.1.2/24", "gateway": "10.1.1.1", "interface": 2}]
    routes = [{"dst": "0.0.0.0/0", "gw": "10.1.1.1"}]
    old = render_result("0.4.0", None, ifaces, ips, routes, None)
    assert old["ips"][0]["version"] == "4" and "mtu" not in old["interfaces"][2]
    new = render_result("1.0.0", None, ifaces, ips, routes, None)
    assert "version" not in new["ips"][0] and "mtu" not in new["interfaces"][2]
    assert render_result("1.1.0", None, ifaces, ips, routes, None)["interfaces"][2]["mtu"] == 1450
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "x"}],
            "ips": [{"address": "10.9.9.9/32", "interface": 0}],
            "dns": {"nameservers": ["1.1.1.1"]}}
    chained = render_result("1.0.0", prev, ifaces, ips, routes, None)
    assert [i["name"] for i in chained["interfaces"]] == ["x", "br", "veth", "eth0"]
    assert chained["ips"][1]["interface"] == 3 and chained["dns"] == prev["dns"]


def test_host_veth_name_is_short_and_deterministic() -> None:
    a = host_veth_name("c" * 64, "eth0")
    assert a == host_veth_name("c" * 64, "eth0") and len(a) <= 15
    assert a != host_veth_name("c" * 64, "eth1")


@pytest.mark.parametrize("text", ['{"a": [1, 2.5, "\\u00e9", null, true, false]}', " [] ",
                                  '{"nested": {"k": "v"}}'])
def test_fast_json_matches_stdlib(text: str) -> None:
    assert loads(text) == json.loads(text)
    assert json.loads(dumps(loads(text))) == json.loads(text)


@pytest.mark.parametrize("text", ["{", "[1,]", "{} x", "NaN", ""])
def test_fast_json_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        loads(text)


def test_start_up_path_imports_no_heavy_module() -> None:
    """The per-pod import set stays stdlib C modules (measured costs in bench/README.md)."""
    repo = str(Path(__file__).resolve().parents[2])
    code = (f"import sys; sys.path.insert(0, {repo!r});"
            "import netagent.cni.plugin, netagent.cni.verbs, netagent.cni.link, netagent.cni.subnet,"
            " netagent.cni.ipam, netagent.cni.ipamdisk;"
            "import netagent.cni.fast; netagent.cni.fast.setns; print(' '.join(sorted(sys.modules)))")
    mods = set(subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True,
                              text=True, check=True).stdout.split())
    heavy = {"json", "typing", "dataclasses", "ipaddress", "subprocess", "re", "enum",
             "pyroute2", "ctypes", "hashlib", "logging", "socket"}
    assert not mods & heavy, mods & heavy
    # the plugin lives in the netagent namespace, whose __init__ is one line: nothing of the
    # daemon may come along
    ours = {m for m in mods if m.startswith("netagent")}
    assert ours == {"netagent", "netagent.cni"} | {m for m in ours if m.startswith("netagent.cni.")}, ours


def test_version_loads_no_verb_module() -> None:
    """VERSION (libcni's validate runs it on every plugin) is answered by cni.skel alone."""
    repo = str(Path(__file__).resolve().parents[2])
    code = (f"import sys; sys.path.insert(0, {repo!r}); import netagent.cni.plugin as p;"
            "out = p.run({'CNI_COMMAND': 'VERSION'}, '{\"cniVersion\": \"0.4.0\"}');"
            "print(out['cniVersion'], sorted(m for m in sys.modules if m.startswith('netagent')))")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True,
                         text=True, check=True).stdout.split(" ", 1)
    assert out[0] == "0.4.0"
    loaded = set(json.loads(out[1].replace("'", '"')))
    assert loaded == {"netagent", "netagent.cni", "netagent.cni.errors", "netagent.cni.fast",
                      "netagent.cni.plugin", "netagent.cni.skel"}, loaded


# --------------------------------------------------------------------------- install


def test_install_cni_writes_client_launcher_and_conflist(tmp_path: Path) -> None:
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    written = install_cni(str(bin_dir), str(conf_dir), subnet_file="/x/subnet.env")
    exe, launcher = bin_dir / "netagent", bin_dir / "netagent.py"
    conflist = conf_dir / CONFLIST_NAME
    assert written == [str(exe), str(launcher), str(conflist)]
    assert os.access(exe, os.X_OK) and os.access(launcher, os.X_OK)
    assert launcher.read_text().splitlines()[0] == f"#!{sys.executable} -IS"
    # the C client when there is a compiler, else the launcher itself (and a note says so)
    if find_compiler() is not None and not is_elf(str(exe)):
        pytest.fail(f"{find_compiler()} is there but cannot build cni/client.c (libc6-dev?)")
    if find_compiler() is None:
        assert not is_elf(str(exe))
    doc = json.loads(conflist.read_text())
    assert [p["type"] for p in doc["plugins"]] == ["netagent", "portmap"]
    assert doc["plugins"][0]["subnetFile"] == "/x/subnet.env"
    # direct exec from a foreign working directory, with a hostile PYTHONPATH, as runtimes do
    # (no server on the default socket here, or one: the answer is the same)
    for prog in (exe, launcher):
        proc = subprocess.run([str(prog)], input='{"cniVersion":"0.4.0"}', capture_output=True,
                              text=True, cwd="/", env={"CNI_COMMAND": "VERSION",
                                                       "PYTHONPATH": "/nonexistent"},
                              check=True)
        assert json.loads(proc.stdout)["cniVersion"] == "0.4.0"
    # an operator's conflist survives a re-install unless forced; the binaries are refreshed
    conflist.write_text("{}")
    assert install_cni(str(bin_dir), str(conf_dir)) == [str(exe), str(launcher)]
    assert conflist.read_text() == "{}"
    assert install_cni(str(bin_dir), str(conf_dir), force=True) == written
    assert json.loads(conflist.read_text())["name"] == "netagent"


def test_install_cni_python_client_is_the_old_launcher(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    install_cni(str(bin_dir), str(tmp_path / "net.d"), client="python")
    exe, launcher = bin_dir / "netagent", bin_dir / "netagent.py"
    assert exe.read_text() == launcher.read_text()
    assert exe.read_text().splitlines()[0] == f"#!{sys.executable} -IS"
    with pytest.raises(ValueError):
        install_cni(str(bin_dir), str(tmp_path / "net.d"), client="rust")


def test_install_cni_without_compiler_falls_back_to_the_launcher(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:

    monkeypatch.setattr(netagent.cni.install, "find_compiler", lambda: None)
    exe = install_cni(str(tmp_path / "bin"), str(tmp_path / "net.d"))[0]
    assert not is_elf(exe)
    assert "no C compiler found" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="needs a C compiler"):
        install_cni(str(tmp_path / "bin"), str(tmp_path / "net.d"), client="c")
    # a compiler that fails: auto says so and keeps the launcher, c raises
    exe = install_cni(str(tmp_path / "bin"), str(tmp_path / "net.d"), cc="false")[0]
    assert not is_elf(exe) and "cannot build the C client" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="false failed"):
        install_cni(str(tmp_path / "bin"), str(tmp_path / "net.d"), client="c", cc="false")


def test_c_string_escapes_for_the_compiler() -> None:
    from netagent.cni.install import _c_string

    assert _c_string("/run/netagent/cni.sock") == '"/run/netagent/cni.sock"'
    assert _c_string('a"b\\c\né') == '"a\\042b\\134c\\012\\303\\251"'


def test_install_parser() -> None:
    import argparse

    from netagent.cni.install import add_install_parser

    parser = argparse.ArgumentParser()
    add_install_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["install-cni", "--bin-dir", "/b", "--conf-dir", "/c", "--force"])
    assert (args.bin_dir, args.conf_dir, args.force) == ("/b", "/c", True) and args.func
    assert (args.client, args.socket) == ("auto", "/run/netagent/cni.sock")
    args = parser.parse_args(["install-cni", "--client", "python", "--socket", "/s"])
    assert (args.client, args.socket) == ("python", "/s")


# --------------------------------------------------------------------------- IPv6 / dual stack

DUAL = ("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/24\n"
        "FLANNEL_IPV6_NETWORK=2001:cafe:42::/56\nFLANNEL_IPV6_SUBNET=2001:cafe:42::1/64\n"
        "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n")
V6_ONLY = ("FLANNEL_IPV6_NETWORK=2001:cafe:42::/56\nFLANNEL_IPV6_SUBNET=2001:cafe:42::1/64\n"
           "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")


def test_subnet_env_dual_stack_and_ipv6_only() -> None:
    dual = parse_subnet_env(DUAL)
    assert [f.version for f in dual.families] == [4, 6]
    assert dual.v6 is not None and dual.v4 is not None
    assert (dual.v6.network_cidr, dual.v6.subnet_cidr, dual.v6.gateway_ip, dual.v6.plen) == (
        "2001:cafe:42::/56", "2001:cafe:42::/64", "2001:cafe:42::1", 64)
    assert (dual.subnet_cidr, dual.gateway_ip, dual.mtu, dual.ipmasq) == (
        "10.5.72.0/24", "10.5.72.1", 1450, False)  # primary family stays IPv4
    only6 = parse_subnet_env(V6_ONLY)
    assert only6.v4 is None and [f.version for f in only6.families] == [6]
    assert (only6.gateway_ip, only6.ipmasq) == ("2001:cafe:42::1", True)
    # a comma-joined value (flannel's readers split on ',') and non-canonical text
    odd = parse_subnet_env(V6_ONLY.replace("2001:cafe:42::1/64",
                                           "2001:CAFE:42:0::1/64,10.0.0.1/24"))
    assert odd.v6 is not None and odd.v6.gateway_ip == "2001:cafe:42::1"


@pytest.mark.parametrize("text,needle", [
    (V6_ONLY.replace("FLANNEL_IPV6_SUBNET=2001:cafe:42::1/64\n", ""), "FLANNEL_IPV6_SUBNET"),
    (DUAL.replace("FLANNEL_SUBNET=10.5.72.1/24\n", ""), "FLANNEL_SUBNET"),
    ("FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n", "FLANNEL_NETWORK"),
    (V6_ONLY.replace("2001:cafe:42::1/64", "10.5.72.1/24"), "malformed"),
    (V6_ONLY.replace("2001:cafe:42::1/64", "2001:cafe:42::1/127"), "no room"),
    (V6_ONLY.replace("2001:cafe:42::1/64", "2001:cafe:42::zz/64"), "malformed"),
    (V6_ONLY.replace("FLANNEL_MTU=1450", "FLANNEL_MTU=1200"), "1280"),
])
def test_subnet_env_ipv6_errors_are_code_5(text: str, needle: str) -> None:
    with pytest.raises(CniError) as e:
        parse_subnet_env(text)
    assert e.value.code == 5 and needle in e.value.msg + e.value.details, e.value.msg


@pytest.mark.parametrize("text", [DUAL, V6_ONLY])
def test_add_reads_dual_stack_and_ipv6_only_subnet_env(plugin_exe: str, tmp_path: Path,
                                                       text: str) -> None:
    """Past subnet.env (no code 5): the next thing ADD checks is the netns, code 4."""
    (tmp_path / "subnet.env").write_text(text)
    err = run_plugin(plugin_exe, "ADD", _conf(tmp_path), cid="c1",
                     netns=str(tmp_path / "nope")).error(4)
    assert err["details"] == "CNI_NETNS"
    call = run_plugin(plugin_exe, "STATUS", _conf(tmp_path, "1.1.0"), ifname="")
    assert call.rc == 0 and call.stdout == "", call


def test_render_result_dual_stack_versions() -> None:
    ifaces = [{"name": "br"}, {"name": "veth"}, {"name": "eth0", "sandbox": "/n"}]
    ips = [{"address": "10.1.1.2/24", "gateway": "10.1.1.1", "interface": 2},
           {"address": "fd00::2/64", "gateway": "fd00::1", "interface": 2}]
    routes = [{"dst": "0.0.0.0/0", "gw": "10.1.1.1"}, {"dst": "::/0", "gw": "fd00::1"}]
    for version in ("0.3.0", "0.3.1", "0.4.0"):
        out = render_result(version, None, ifaces, ips, routes, None)
        assert [ip["version"] for ip in out["ips"]] == ["4", "6"]
        assert out["routes"] == routes
    for version in ("1.0.0", "1.1.0"):
        out = render_result(version, None, ifaces, ips, routes, None)
        assert all("version" not in ip for ip in out["ips"]) and len(out["ips"]) == 2


@pytest.mark.parametrize("raw,want", [
    ("IP=10.5.72.9", {4: "10.5.72.9"}),
    ("IP=2001:cafe:42::9", {6: "2001:cafe:42::9"}),
    ("IP=10.5.72.9,2001:CAFE:42:0::9", {4: "10.5.72.9", 6: "2001:cafe:42::9"}),
    ("IP=2001:cafe:42::9/64,10.5.72.9/24", {4: "10.5.72.9", 6: "2001:cafe:42::9"}),
    ("IP=10.5.72.9,10.5.72.10", {4: "10.5.72.9"}),  # first of a family wins
])
def test_requested_ips_per_family(raw: str, want: dict[int, str]) -> None:
    env = Env({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/n",
               "CNI_IFNAME": "eth0", "CNI_ARGS": raw})
    env.validate()
    cfg = Config({"cniVersion": "1.0.0", "name": "n", "type": "netagent"})
    assert cfg.requested_ips(env) == want


def test_requested_ip_garbage_is_code_7() -> None:
    env = Env({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/n",
               "CNI_IFNAME": "eth0", "CNI_ARGS": "IP=10.5.72.9,nonsense"})
    env.validate()
    cfg = Config({"cniVersion": "1.0.0", "name": "n", "type": "netagent"})
    with pytest.raises(CniError) as e:
        cfg.requested_ips(env)
    assert e.value.code == 7 and "nonsense" in e.value.msg


def test_fast_ipv6_helpers() -> None:
    from netagent.cni.fast import format_ip, normalize_cidr, parse_cidr_any, parse_ip_any

    assert parse_ip_any("2001:CAFE:42:0:0::1") == (6, 0x2001CAFE004200000000000000000001)
    assert format_ip(6, 0x2001CAFE004200000000000000000001) == "2001:cafe:42::1"
    assert parse_cidr_any("10.1.2.3/24") == (4, 0x0A010203, 24)
    assert normalize_cidr("FD00:0::2/64") == "fd00::2/64"
    for bad in ("fd00::1%eth0", "1:2:3:4:5:6:7:8:9", "::1/129", "fd00::/x"):
        with pytest.raises(ValueError):
            parse_cidr_any(bad if "/" in bad else bad + "/64")

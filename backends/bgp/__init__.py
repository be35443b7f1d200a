"""The bgp backend (BIRD 2): ``render`` (bird.conf, pure), ``birdc`` (client and parser),
``supervisor`` (the BIRD process), ``kernelroutes`` (BIRD's leftovers), ``backend`` (glue).

Importing the package imports nothing else, as for the other backends (the table in
``netagent.backends`` names ``netagent.backends.bgp.backend:BgpBackend``)."""

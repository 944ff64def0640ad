"""sdxl-serve, the program: the `sdxl-serve` command, the local `up` launcher and `status`.

Layers, checked by the import contract (`make check`): `common` is the floor; `gateway` and `worker`
stand on it; this package stands on those; `bench`, `testkit` and the tests stand on top.
"""

"""The lab: what measures or demonstrates Equilibrium, never what runs on a node.

The simulator (``sim``), the benchmarks (``bench``), the UrbanMove demo
(``demo``), the test backends (``testbed``) and the load generator
(``loadgen``). The runtime never imports this package (an import-linter
contract holds that line), and the image and the wheel leave it out.
"""

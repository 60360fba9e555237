"""The kernel side: BPF sources, loader (bcc), and pinned-map access (libbpf).

Only this package touches bcc or libbpf. The long-running agent imports
`maps` and `libbpf` (ctypes on libbpf.so.1); only `loader` imports bcc, and
it runs in a short-lived child process.
"""

"""The long-running node agent: config -> policy -> weights -> pinned maps.

Never imports bcc: the loader runs in a child process (datapath.loader).
"""

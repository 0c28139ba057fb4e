"""What every stage needs to write and read safely.

    atomic.py          atomic files and directories (temp file, fsync, rename; staged directories)
    locks.py           flock locks: one build per index directory, readers pinning a generation
    faults.py          named fault points where the crash tests kill or pause a process
    textfiles.py       UTF-8 and CSV inputs and JSON manifests, with errors naming file and line
    versions.py        library versions and timestamps recorded in manifests
"""

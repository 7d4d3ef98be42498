"""The bytes of files: safetensors headers and tensors, checkpoints, writers, atomic outputs, claims, copies.

This package is the only part of loratool that opens, reads or writes a file's bytes. Its modules, each
importing only those listed before it: header (the parsed, size-checked header and the guarded opens),
paths (names and links kept inside their folder), tensors (lazy tensors), checkpoint (base models,
sharded or not), writers (StreamingWriter, save_tensors), claims (the lock beside an output), outputs
(check_output, atomic_output) and copies (copies of input files, sha256). Nothing is re-exported here:
import from the module that holds the name.
"""

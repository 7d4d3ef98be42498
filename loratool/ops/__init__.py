"""One module per verb. Each takes typed arguments and returns a result dataclass with to_dict().

Nothing here prints or exits; long loops take a progress callback (done, total).
"""

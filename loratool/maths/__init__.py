"""Tensor maths for LoRA factors, one idea per module, no I/O: guards (finite values, threads),
delta (factors, ΔW, DoRA), svd (exact, truncated and randomized SVD, rank rules), combine, lycoris,
merge (merge kernels), quant (fp8/nf4/int8), bake (runtime layouts), fuse (fused modules) and compare
(diff/verify projections). Lower modules never import higher ones, in that order; import from the
module itself (`from loratool.maths.svd import lowrank_svd`): this package re-exports nothing.
"""

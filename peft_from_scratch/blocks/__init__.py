"""Pieces several methods are built from, in any family.

* ``lowrank``: ``LowRank``, the s B A dropout(x) branch of LoRA, DoRA and RoSA.
* ``masks``: gradient statistics and top-k masks, for RoSA's sparse part and selective methods.

A block imports only the core and the kernels; methods compose blocks.
"""

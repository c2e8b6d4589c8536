"""Adapters: which linears get one (``targets``), the ZO-Act layer (``layer``), its one-shot activation
basis (``basis``) or a random one (``subspace``), :func:`build.build_adapters`, the one public way to
attach them, and their files on disk: PEFT LoRA and checkpoints (``files``)."""

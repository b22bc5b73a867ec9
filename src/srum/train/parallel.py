"""FSDP2 for ``ModelParallelStrategy``: activation checkpointing and ``fully_shard`` per layer, applied from
outside the model (the model code stays single-device).

Every module the inference path calls on its own (embeddings, heads, adapters, the vision encoder) becomes its
own FSDP unit, so rollouts and scoring, which do not go through ``Bagel.forward``, still gather what they use.
"""

from __future__ import annotations

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from srum.model.bagel import Bagel


def _mixed_precision(precision: str) -> MixedPrecisionPolicy | None:
    if precision.startswith("bf16"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def shard_model(model: Bagel, mesh: DeviceMesh, activation_checkpointing: bool,
                mp_policy: MixedPrecisionPolicy | None) -> None:
    options = {"mesh": mesh} | ({"mp_policy": mp_policy} if mp_policy is not None else {})
    layers = model.language_model.model.layers
    for index, layer in enumerate(layers):
        if activation_checkpointing:
            layer = checkpoint_wrapper(layer)
            layers[index] = layer
        fully_shard(layer, **options)
    if model.config.visual_und:
        for layer in model.vit_model.vision_model.encoder.layers:
            fully_shard(layer, **options)
        fully_shard(model.vit_model, **options)
        fully_shard(model.connector, **options)
    if model.config.visual_gen:
        for name in ("time_embedder", "vae2llm", "llm2vae"):
            fully_shard(getattr(model, name), **options)
    llm = model.language_model
    fully_shard(llm.model.embed_tokens, **options)
    # Heads and final norms as one unit, kept gathered after forward: backward needs them first.
    heads = [llm.lm_head, llm.model.norm] + ([llm.model.norm_moe_gen] if model.config.llm.is_mot else [])
    fully_shard(heads, reshard_after_forward=False, **options)
    fully_shard(model, **options)
    _initialise_root(model)


@torch.no_grad()
def _initialise_root(model: Bagel) -> None:
    """FSDP2 picks its root on the first forward. Rollouts and scoring call sub-units directly (embeddings,
    heads, adapters), so one tiny forward through ``Bagel`` itself comes first and makes it the root."""
    from srum.model.packing import pack
    from srum.model.synthetic import SampleFactory, special_tokens_for

    config = model.config
    batch = pack(SampleFactory(config, seed=0, max_grid=1).mixed(3), config, special_tokens_for(config))
    device = next(model.parameters()).device
    model(batch.to(device))


def parallelize(model: Bagel, reference: Bagel | None, mesh: DeviceMesh, activation_checkpointing: bool,
                precision: str) -> None:
    """Shard the trained model (and the frozen reference copy) over the data-parallel mesh dimension;
    ``precision`` is the trainer's (``bf16-mixed`` computes in bfloat16 and reduces in float32)."""
    data_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
    policy = _mixed_precision(precision)
    shard_model(model, data_mesh, activation_checkpointing, policy)
    if reference is not None:
        shard_model(reference, data_mesh, False, policy)

"""FSDP2 for ``ModelParallelStrategy``: activation checkpointing and ``fully_shard`` per layer, applied from
outside the model (the model code stays single-device).

Every module the inference path calls on its own (embeddings, heads, adapters, the vision encoder) becomes its
own FSDP unit, so rollouts and scoring, which do not go through ``Bagel.forward``, still gather what they use.
:func:`fsdp_units` is the one list of units: sharding applies it and ``srum plan`` sizes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from srum.model.bagel import Bagel


@dataclass(frozen=True)
class Unit:
    """One ``fully_shard`` call: its parameters are gathered together and resharded together."""

    name: str
    modules: tuple[nn.Module, ...]
    reshard_after_forward: bool = True


def fsdp_units(model: Bagel) -> list[Unit]:
    """The units in the order they are wrapped, innermost first; the last one is the whole model (the root,
    which owns every parameter no earlier unit took)."""
    llm = model.language_model
    units = [Unit(f"decoder layer {i}", (layer,)) for i, layer in enumerate(llm.model.layers)]
    if model.config.visual_und:
        vision_layers = model.vit_model.vision_model.encoder.layers
        units += [Unit(f"vision layer {i}", (layer,)) for i, layer in enumerate(vision_layers)]
        units += [Unit("vision encoder", (model.vit_model,)), Unit("connector", (model.connector,))]
    if model.config.visual_gen:
        units += [Unit(name, (getattr(model, name),)) for name in ("time_embedder", "vae2llm", "llm2vae")]
    units.append(Unit("token embedding", (llm.model.embed_tokens,)))
    # Heads and final norms as one unit, kept gathered after forward: backward needs them first.
    heads = (llm.lm_head, llm.model.norm) + ((llm.model.norm_moe_gen,) if model.config.llm.is_mot else ())
    units.append(Unit("heads", heads, reshard_after_forward=False))
    # The root stays gathered after forward too (FSDP2's own default for a root): backward starts there.
    units.append(Unit("root", (model,), reshard_after_forward=False))
    return units


def _mixed_precision(precision: str) -> MixedPrecisionPolicy | None:
    if precision.startswith("bf16"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def shard_model(model: Bagel, mesh: DeviceMesh, activation_checkpointing: bool,
                mp_policy: MixedPrecisionPolicy | None) -> None:
    options = {"mesh": mesh} | ({"mp_policy": mp_policy} if mp_policy is not None else {})
    layers = model.language_model.model.layers
    if activation_checkpointing:
        for index, layer in enumerate(layers):
            layers[index] = checkpoint_wrapper(layer)
    for unit in fsdp_units(model):
        modules = list(unit.modules) if len(unit.modules) > 1 else unit.modules[0]
        fully_shard(modules, reshard_after_forward=unit.reshard_after_forward, **options)
    _initialise_root(model)


@torch.no_grad()
def _initialise_root(model: Bagel) -> None:
    """FSDP2 picks its root on the first forward. Rollouts and scoring call sub-units directly (embeddings,
    heads, adapters), so one tiny forward through ``Bagel`` itself comes first and makes it the root. A model on
    the meta device (a plan: shapes only) has nothing to run."""
    from srum.model.packing import pack
    from srum.model.synthetic import SampleFactory, special_tokens_for

    device = next(model.parameters()).device
    if device.type == "meta":
        return
    config = model.config
    batch = pack(SampleFactory(config, seed=0, max_grid=1).mixed(3), config, special_tokens_for(config))
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

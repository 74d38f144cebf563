"""Components: named groups of the classifier's parameter tensors that MMMS mixes with one
factor each. Only the image tower and the head exist here (never the text tower), so no
optimiser dimension is spent on tensors that cannot change a prediction.

Levels: 0 whole model; 1 stem / transformer / head; 2 stem / one per block / head;
3 one per parameter tensor; "reference": the reference implementation's level 1 without its
five text-tower groups, i.e. the whole image tower, the head weight and the head bias.
Works for open_clip's VisionTransformer and ModifiedResNet and,
through timm's own parameter grouping, for timm towers."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

LEVEL_NAMES = {0: "model", 1: "stem / transformer / head", 2: "per block", 3: "per tensor"}
# the reference implementation's level 1, less its text-tower groups: image tower, head weight, head bias
REFERENCE = "reference"

STEM, BODY, HEAD = "stem", "transformer", "head"


@dataclass(frozen=True)
class Component:
    name: str
    params: tuple[str, ...]
    # floating-point buffers (BatchNorm running stats) that must be mixed like the params
    buffers: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Place:
    """Where one tensor sits: its level-1 group and, inside the body, its block."""
    group: str
    block: str = ""
    order: tuple = ()


def _vit_place(name: str) -> _Place:
    m = re.match(r"transformer\.resblocks\.(\d+)\.", name)
    if m:
        return _Place(BODY, f"block.{m[1]}", (int(m[1]),))
    if re.match(r"(ln_post|proj|attn_pool|attn_pool_contrastive)(\.|$)", name):
        return _Place(HEAD)
    return _Place(STEM)


def _resnet_place(name: str) -> _Place:
    m = re.match(r"layer(\d+)\.(\d+)\.", name)
    if m:
        return _Place(BODY, f"layer{m[1]}.{m[2]}", (int(m[1]), int(m[2])))
    if name.startswith("attnpool."):
        return _Place(HEAD)
    return _Place(STEM)


def _timm_placer(visual: nn.Module):
    """timm towers: timm's group_matcher says which tensors form the stem and each block."""
    from timm.models import group_parameters

    trunk = visual.trunk
    matcher = trunk.group_matcher(coarse=False)
    layer_of = group_parameters(trunk, matcher, reverse=True)
    stem_re = re.compile(matcher["stem"]) if isinstance(matcher.get("stem"), str) else None
    head_re = re.compile(r"(norm|fc_norm|head|attn_pool)(\.|$)")

    def group(inner: str) -> str:
        if stem_re is not None and stem_re.match(inner):
            return STEM
        return HEAD if head_re.match(inner) or inner not in layer_of else BODY

    # timm's layer ids count the stem too; blocks are numbered from 0 here
    body_ids = sorted({layer_of[n] for n, _ in trunk.named_parameters() if group(n) == BODY})
    block_index = {lid: i for i, lid in enumerate(body_ids)}

    def place(name: str) -> _Place:
        if not name.startswith("trunk."):
            return _Place(HEAD)  # open_clip's projection on top of the trunk
        inner = name[len("trunk."):]
        g = group(inner)
        if g != BODY:
            return _Place(g)
        i = block_index[layer_of[inner]]
        return _Place(BODY, f"block.{i}", (i,))

    return place


def _placer(visual: nn.Module):
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        return _vit_place
    if isinstance(visual, ModifiedResNet):
        return _resnet_place
    if hasattr(visual, "trunk") and hasattr(visual.trunk, "group_matcher"):
        return _timm_placer(visual)
    raise TypeError(f"no component layout for image tower {type(visual).__name__}: "
                    f"supported are open_clip's VisionTransformer, ModifiedResNet and timm towers")


def _placements(model: nn.Module) -> dict[str, _Place]:
    """Every parameter of the classifier -> its place; the head Linear joins the head group."""
    place = _placer(model.visual)
    out = {}
    for name, _ in model.named_parameters():
        if name.startswith("visual."):
            out[name] = place(name[len("visual."):])
        elif name.startswith("head."):
            out[name] = _Place(HEAD)
        else:
            raise ValueError(f"parameter {name!r} is neither under visual. nor head.")
    return out


def _grouped(places: dict[str, _Place], level: int) -> list[tuple[str, list[str]]]:
    """(component name, params) in stable order: stem, blocks in forward order, head."""
    if level == 0:
        return [("model", list(places))]
    if level == REFERENCE:
        # JrsUtilModel's level 1 keeps each top-level module whole; of its 8 groups these 3
        # touch the classifier: the image tower and the classification head's two tensors
        tower = [n for n in places if n.startswith("visual.")]
        head = [n for n in places if not n.startswith("visual.")]
        return [("visual", tower)] + [(n, [n]) for n in head]
    key_of = {STEM: (0, ()), HEAD: (2, ())}
    groups: dict[str, list[str]] = {}
    sort_key: dict[str, tuple] = {}
    for name, p in places.items():
        comp = p.block if (level >= 2 and p.group == BODY) else p.group
        groups.setdefault(comp, []).append(name)
        sort_key[comp] = key_of.get(comp, (1, p.order))
    ordered = sorted(groups, key=lambda c: sort_key[c])
    if level == 3:
        return [(n, [n]) for c in ordered for n in groups[c]]
    return [(c, groups[c]) for c in ordered]


def _module_of(tensor_name: str) -> str:
    return tensor_name.rsplit(".", 1)[0] if "." in tensor_name else ""


def _attach_buffers(model: nn.Module, comps: list[tuple[str, list[str]]]) -> list[Component]:
    """Floating buffers go with the component of their module's first parameter."""
    params = {n for n, _ in model.named_parameters()}
    comp_of_module: dict[str, int] = {}
    for i, (_, names) in enumerate(comps):
        for n in names:
            comp_of_module.setdefault(_module_of(n), i)
    buffers: list[list[str]] = [[] for _ in comps]
    for name, t in model.state_dict().items():
        if name in params or not torch.is_floating_point(t):
            continue  # integer buffers (BatchNorm's num_batches_tracked) do not mix
        module = _module_of(name)
        while module not in comp_of_module and module:
            module = _module_of(module)  # a parameter-free module: use its parent's component
        buffers[comp_of_module.get(module, 0)].append(name)
    return [Component(c, tuple(names), tuple(b)) for (c, names), b in zip(comps, buffers)]


def components(model: nn.Module, level: int | str) -> list[Component]:
    """The classifier's components at ``level`` (0-3 or "reference"); every parameter appears
    exactly once."""
    if level != REFERENCE and level not in LEVEL_NAMES:
        raise ValueError(f"component level must be one of {[*LEVEL_NAMES, REFERENCE]}, got {level!r}")
    return _attach_buffers(model, _grouped(_placements(model), level))


def component_index(comps: list[Component]) -> dict[str, int]:
    """Tensor name (parameter or buffer) -> index of its component."""
    return {n: i for i, c in enumerate(comps) for n in c.params + c.buffers}

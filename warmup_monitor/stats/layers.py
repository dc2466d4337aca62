"""Per-group gradient statistics: which parameters form a group, and the sums per group.

A *group* is a top-level block of the model (an embedding, one block of the trunk, the head) or
whatever a module-name pattern names (:class:`~warmup_monitor.Statistics` ``layers``). Groups
are found once per fit, from the module and the optimizer's parameters:

- :func:`layer_groups` names the groups, in depth order, and gives each parameter its group;
- :class:`PlanGroups` tells a kernel plan (:mod:`~warmup_monitor.stats.plans`) how its blocks
  or tensors fall into groups, so that the plan's own pass over the gradients (or the
  parameters) also returns one sum of squares per group: in the block plan each block's dot
  product is cut at the group boundaries inside the block; in the foreach plan the per-tensor
  norms of the one ``torch._foreach_norm`` are added per group (``index_add_``).

The rule of ``"auto"`` (:func:`auto_groups`): descend through wrappers (a module whose
parameters all sit in one child, as a LightningModule holding ``self.model``); a container
(``nn.Sequential``, ``nn.ModuleList``) at the top is cut into its children; otherwise the
shallowest containers with at least two children holding parameters form the trunk, each of
their children is a group, and every other child on the way down to them is a group of its own
(as are parameters held directly by a module on the way). So a Hugging Face GPT-2 gives
``transformer.wte``, ``transformer.wpe``, ``transformer.h.0`` ... ``transformer.ln_f``
(``lm_head`` is tied to ``wte``: its one parameter is counted there); a timm ViT gives
``cls_token``, ``pos_embed``, ``patch_embed``, ``blocks.0`` ..., ``norm``, ``head``; a timm
ConvNeXt ``stem``, ``stages.0`` ... ``stages.3``, ``head``; a torchvision ResNet ``conv1``,
``bn1``, ``layer1.0`` ... ``layer4.2``, ``fc``; an ``nn.Sequential`` each child with parameters.

This module imports no Lightning.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from warmup_monitor.stats.plans import BlockPlan, Plan

#: The group of watched parameters that no pattern (or no module) names.
OTHER = "_other"
_CONTAINERS = (nn.Sequential, nn.ModuleList)


@dataclass(frozen=True)
class Groups:
    """The groups of one optimizer's parameters.

    Attributes:
        names: Group names, in depth order (a module's qualified name, or a parameter's).
        of_param: For each watched parameter (the optimizer's order), its group's index.
    """

    names: list[str]
    of_param: list[int]

    def __len__(self) -> int:
        return len(self.names)


def auto_groups(module: nn.Module) -> list[tuple[str, list[str]]]:
    """The ``"auto"`` groups of ``module``: ``(group name, parameter names)`` in depth order.

    Parameter names are those of ``module.named_parameters()`` (a tied parameter once, under
    its first name). See the module docstring for the rule.
    """
    names = {id(p): n for n, p in module.named_parameters()}

    def params_under(prefix: str, m: nn.Module) -> list[str]:
        out = []
        for n, p in m.named_parameters(prefix=prefix):
            if names.get(id(p)) == n:  # a tied parameter belongs to its first name only
                out.append(n)
        return out

    def join(prefix: str, name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    def holders(prefix: str, m: nn.Module) -> list[tuple[str, nn.Module]]:
        return [
            (join(prefix, n), c) for n, c in m.named_children() if params_under(join(prefix, n), c)
        ]

    # Descend through wrappers: no parameter of their own, one child with parameters.
    prefix, root = "", module
    while True:
        own = [n for n, _ in root.named_parameters(recurse=False)]
        kids = holders(prefix, root)
        if own or len(kids) != 1 or isinstance(root, _CONTAINERS):
            break
        prefix, root = kids[0]

    if isinstance(root, _CONTAINERS):
        return [(n, params_under(n, c)) for n, c in holders(prefix, root)]

    # The trunk: the shallowest containers of two or more blocks (children that are modules
    # of modules, as a transformer block); failing those, of two or more layers.
    level: list[tuple[str, nn.Module]] = [(prefix, root)]
    of_blocks: set[str] = set()
    of_layers: set[str] = set()
    while level and not of_blocks:
        nxt: list[tuple[str, nn.Module]] = []
        for n, m in level:
            for cn, c in holders(n, m):
                kids = holders(cn, c)
                if isinstance(c, _CONTAINERS) and len(kids) >= 2:
                    if any(next(k.children(), None) is not None for _, k in kids):
                        of_blocks.add(cn)
                    elif not of_layers or all(t.count(".") == cn.count(".") for t in of_layers):
                        of_layers.add(cn)
                nxt.append((cn, c))
        level = nxt
    trunk = of_blocks or of_layers

    def expand(n: str, m: nn.Module) -> list[tuple[str, list[str]]]:
        if n in trunk:
            return [(cn, params_under(cn, c)) for cn, c in holders(n, m)]
        if not any(t == n or t.startswith(n + ".") or not n for t in trunk):
            return [(n, params_under(n, m))]
        out = []
        for pn, p in m.named_parameters(recurse=False):
            full = join(n, pn)
            if names.get(id(p)) == full:
                out.append((full, [full]))
        for cn, c in holders(n, m):
            out.extend(expand(cn, c))
        return out

    if not trunk:
        out = [
            (join(prefix, pn), [join(prefix, pn)])
            for pn, p in root.named_parameters(recurse=False)
            if names.get(id(p)) == join(prefix, pn)
        ]
        return out + [(n, params_under(n, c)) for n, c in holders(prefix, root)]
    return expand(prefix, root)


def pattern_groups(module: nn.Module, patterns: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Groups named by patterns: every module (or parameter) whose qualified name matches one
    of ``patterns`` in full (:func:`re.fullmatch`), the outermost one where they nest, in depth
    order."""
    compiled = [re.compile(p) for p in patterns]
    names = {id(p): n for n, p in module.named_parameters()}
    taken: set[str] = set()
    out: list[tuple[str, list[str]]] = []
    for qual, m in module.named_modules():
        if not qual or not any(c.fullmatch(qual) for c in compiled):
            continue
        members = [
            n
            for n, p in m.named_parameters(prefix=qual)
            if names.get(id(p)) == n and n not in taken
        ]
        if members:
            taken.update(members)
            out.append((qual, members))
    for n in names.values():  # parameters named directly (``cls_token``)
        if n not in taken and any(c.fullmatch(n) for c in compiled):
            taken.add(n)
            out.append((n, [n]))
    order = {n: i for i, n in enumerate(names.values())}
    out.sort(key=lambda g: min(order[n] for n in g[1]))
    return out


def layer_groups(
    module: nn.Module, params: Sequence[Tensor], layers: str | Sequence[str]
) -> Groups | None:
    """The groups of ``params`` (one optimizer's watched parameters) in ``module``.

    Args:
        module: The model the parameters belong to.
        params: The parameters, in the order the statistics walk them.
        layers: ``"auto"``, or a pattern or sequence of patterns of module names (a validated
            ``Statistics.layers``).

    Returns:
        The groups holding at least one of ``params``, in depth order, plus :data:`OTHER` for
        the parameters no group holds (none with ``"auto"`` unless a parameter is not in
        ``module``); ``None`` if no group holds any of ``params``.
    """
    if isinstance(layers, str) and layers == "auto":
        found = auto_groups(module)
    else:
        found = pattern_groups(module, [layers] if isinstance(layers, str) else list(layers))
    by_name = {id(p): n for n, p in module.named_parameters()}
    group_of_name = {pn: gi for gi, (_, members) in enumerate(found) for pn in members}
    raw = []
    for p in params:
        n = by_name.get(id(p))
        raw.append(group_of_name.get(n, -1) if n is not None else -1)
    used = sorted({g for g in raw if g >= 0})
    if not used:
        return None
    remap = {g: i for i, g in enumerate(used)}
    names = [found[g][0] for g in used]
    if any(g < 0 for g in raw):
        names.append(OTHER)
    other = len(names) - 1
    return Groups(names, [remap[g] if g >= 0 else other for g in raw])


def group_param_names(
    groups: Groups, params: Iterable[Tensor], module: nn.Module
) -> dict[str, list[str]]:
    """``{group name: [parameter names]}`` (for tests and messages)."""
    by_name = {id(p): n for n, p in module.named_parameters()}
    out: dict[str, list[str]] = {n: [] for n in groups.names}
    for p, g in zip(params, groups.of_param, strict=True):
        out[groups.names[g]].append(by_name.get(id(p), "?"))
    return out


# ------------------------------------------------------------------------------ plan side


class PlanGroups:
    """How the pieces one kernel plan visits fall into groups.

    Args:
        of_tensor: The group of each tensor of the plan, in the plan's layout order.
        n_groups: The number of groups (of all plans together).
        blocks: For the block plan: per block, ``(first tensor, stop, chunked, start, length)``
            as the plan walks it; ``None`` for the foreach plan.
        sizes: The plan's tensor sizes (layout order).
        device: Where the sums live.
    """

    def __init__(
        self,
        of_tensor: list[int],
        n_groups: int,
        blocks: list[tuple[int, int, bool]] | None,
        sizes: list[int],
        device: torch.device,
    ) -> None:
        self.n = n_groups
        self.device = device
        self.of_tensor = of_tensor
        self._tensor_index = torch.tensor(of_tensor, dtype=torch.long, device=device)
        #: Per block: ``None`` when the whole block is one group, else the lengths of its
        #: segments (runs of one group, for ``Tensor.split``); and the group of each segment.
        self.lengths: list[list[int] | None] = []
        self.seg_groups: list[list[int]] = []
        for first, stop, chunked in blocks or []:
            if chunked:
                self.lengths.append(None)
                self.seg_groups.append([of_tensor[first]])
                continue
            lengths: list[int] = []
            gs: list[int] = []
            for i in range(first, stop):
                g, n = of_tensor[i], sizes[i]
                if gs and gs[-1] == g:
                    lengths[-1] += n
                else:
                    lengths.append(n)
                    gs.append(g)
            self.lengths.append(None if len(gs) == 1 else lengths)
            self.seg_groups.append(gs)
        self._full = [g for gs in self.seg_groups for g in gs]
        self._full_index = torch.tensor(self._full, dtype=torch.long, device=device)
        self._seen: list[int] = []

    # ---- block plan

    def begin(self) -> None:
        """Start a pass of the block plan."""
        self._seen = []

    def block(self, j: int, x: Tensor, out: list[Tensor]) -> None:
        """Append the sum of squares of each group's part of block ``j`` (``x``) to ``out``."""
        lengths = self.lengths[j]
        if lengths is None:
            out.append(torch.dot(x, x))
        else:  # one split (a C++ call) instead of a Python slice per segment
            for part in x.split(lengths):
                out.append(torch.dot(part, part))
        self._seen.extend(self.seg_groups[j])

    def block_sums(self, parts: Tensor, dtype: torch.dtype) -> Tensor:
        """The per-group sums of a block pass's ``parts`` (one per segment seen, in order)."""
        index = self._full_index if len(self._seen) == len(self._full) else self._index()
        out = torch.zeros(self.n, dtype=dtype, device=parts.device)
        return out.index_add_(0, index.to(parts.device), parts.to(dtype))

    def _index(self) -> Tensor:
        return torch.tensor(self._seen, dtype=torch.long, device=self.device)

    # ---- foreach plan

    def tensor_sums(self, per_tensor: Tensor, present: Sequence[bool] | None = None) -> Tensor:
        """Per-group sums of per-tensor values (layout order; only the ``present`` ones)."""
        if present is None:
            index = self._tensor_index
        else:
            index = torch.tensor(
                [g for g, ok in zip(self.of_tensor, present, strict=True) if ok],
                dtype=torch.long,
                device=self.device,
            )
        out = torch.zeros(self.n, dtype=per_tensor.dtype, device=per_tensor.device)
        return out.index_add_(0, index.to(per_tensor.device), per_tensor)


def attach_groups(plan: Plan, of_param: Sequence[int], n_groups: int) -> None:
    """Give ``plan`` its :class:`PlanGroups` (``of_param``: the group of each parameter of the
    caller's list, which ``plan.index`` points into)."""
    of_tensor = [of_param[i] for i in plan.index]
    blocks = None
    if isinstance(plan, BlockPlan):
        blocks = [(u.first, u.stop, u.chunked) for u in plan.units for _ in u.spans]
    plan.groups = PlanGroups(of_tensor, n_groups, blocks, plan.sizes, plan.device)
    plan.group_sums = None

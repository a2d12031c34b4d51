"""Lockstep execution of a captured graph over several batches, node by node.

:class:`GraphRunner` walks the graph once in topological order and evaluates each node for every
batch in the set before moving on, keeping a value only until its last user has run. Two hooks
make the passes:

* ``on_site(node, site, inputs)`` runs just before a prunable site's node executes, with that
  node's input activation for every batch (the calibration pass accumulates ``XᵀX`` there; the
  sequential pass also prunes there, so later nodes see the pruned weights);
* weights are read through ``weights`` (name → tensor) before the module's own parameters, so
  pruned values take effect inside the run without touching the user's model.

An expert slice site (``…experts.gate_up_proj[3]``, see :mod:`.experts`) shares its grouped-product
node with the other experts of its parameter: ``on_site`` is called once per slice, with only the
rows routed to that expert (``rows_of`` gives them for the last run), and a 3-D parameter is read
with every substituted slice written into a copy of it.

Nodes with no placeholder ancestor (parameters and what is computed from them only, such as a
transposed weight) are evaluated at use time, so a substituted weight is always the one used.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from moonshot_fx.errors import CalibrationError, MoonshotError

from . import experts as moe
from .capture import CapturedGraph
from .discover import Site
from .partition import block_key, segments

SiteHook = Callable[[fx.Node, Site, list[torch.Tensor]], None]


class GraphRunner:
    """Evaluate ``captured.gm`` on a list of batches at once (see module docstring)."""

    def __init__(self, captured: CapturedGraph, sites: Sequence[Site], weights: dict[str, torch.Tensor] | None = None):
        self.captured = captured
        self.gm = captured.gm
        self.sites = list(sites)
        self.weights = weights if weights is not None else {}
        nodes = list(self.gm.graph.nodes)
        self.nodes = nodes
        by_name = {n.name: n for n in nodes}
        #: node → the sites it uses (several for a grouped expert product: one per expert slice)
        self.sites_of_node: dict[fx.Node, list[Site]] = {}
        for s in self.sites:
            for name in s.nodes:
                self.sites_of_node.setdefault(by_name[name], []).append(s)
        self.site_of_node = {n: ss[0] for n, ss in self.sites_of_node.items()}
        #: 3-D parameter FQN → its expert slice sites (substitutes are written into a copy)
        self.slices_of: dict[str, list[Site]] = {}
        for s in self.sites:
            if s.slice_index is not None:
                self.slices_of.setdefault(s.parameter_name, []).append(s)
        #: (node name, site name, batch) → that expert's rows in the node's input, last run
        self.expert_slices: dict[tuple[str, str, int], slice] = {}
        self._assembled: dict[str, tuple[tuple[int, ...], torch.Tensor]] = {}
        self._get_attr_names = self._attr_aliases()
        self.order = {n: i for i, n in enumerate(nodes)}
        self.batch_dependent: set[fx.Node] = set()
        for n in nodes:
            if n.op == "placeholder" or any(a in self.batch_dependent for a in n.all_input_nodes):
                self.batch_dependent.add(n)
        self.last_use: dict[fx.Node, int] = {}
        for n in nodes:
            for a in n.all_input_nodes:
                self.last_use[a] = max(self.last_use.get(a, -1), self.order[n])

    def _attr_aliases(self) -> dict[str, str]:
        """get_attr target → canonical parameter name for substituted weights."""
        names = {}
        params = dict(self.gm.named_parameters(remove_duplicate=False))
        for s in self.sites:
            for alias in s.aliases:
                alias = moe.split_slice_name(alias)[0] if s.slice_index is not None else alias
                if alias in params:
                    names[alias] = s.parameter_name
        return names

    def fetch_attr(self, target: str) -> Any:
        """A parameter/buffer, with pruned substitutes taking precedence."""
        canonical = self._get_attr_names.get(target)
        if canonical is not None and canonical in self.weights:
            return self.weights[canonical]
        value: Any = self.gm
        for part in target.split("."):
            value = getattr(value, part)
        if canonical is not None and canonical in self.slices_of:
            return self._with_slices(canonical, value)
        return value

    def _with_slices(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """``param`` (3-D) with its substituted expert slices written into a copy (cached until
        the set of substitutes changes); ``param`` itself when none is substituted."""
        subs = [(s.slice_index, self.weights[s.name]) for s in self.slices_of[name] if s.name in self.weights]
        if not subs:
            return param
        key = tuple(id(w) for _, w in subs)
        cached = self._assembled.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        out = param.detach().clone()
        for e, w in subs:
            out[e] = w.to(out.dtype)
        self._assembled[name] = (key, out)
        return out

    def rows_of(self, node: fx.Node, site: Site, batch: int = 0) -> slice | None:
        """The rows of ``node``'s input (and output) that belong to expert slice ``site`` in the
        last run; None for an ordinary site (all rows)."""
        return self.expert_slices.get((node.name, site.name, batch))

    def _site_inputs(self, node: fx.Node, site: Site, value: Callable[[int], Callable[[fx.Node], Any]],
                     nb: int) -> list[torch.Tensor]:
        """``site``'s input at ``node`` for every batch: an expert slice gets its routed rows only."""
        x_node = next(a for a in node.all_input_nodes if a.name == site.inputs[site.nodes.index(node.name)])
        xs = [value(b)(x_node) for b in range(nb)]
        if site.slice_index is None:
            return xs
        offs_node = moe.offsets_node(node)
        assert offs_node is not None  # discovery skips grouped products without offsets
        out = []
        for b, x in enumerate(xs):
            rows = moe.expert_rows(value(b)(offs_node), site.slice_index)
            self.expert_slices[(node.name, site.name, b)] = rows
            out.append(x[rows])
        return out

    def _const(self, node: fx.Node) -> Any:
        if node.op == "get_attr":
            return self.fetch_attr(str(node.target))
        args = fx.node.map_arg(node.args, self._const)
        kwargs = fx.node.map_arg(node.kwargs, self._const)
        return self._call(node, args, kwargs)

    def _call(self, node: fx.Node, args: Any, kwargs: Any) -> Any:
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module":
            return self.gm.get_submodule(str(node.target))(*args, **kwargs)
        raise RuntimeError(f"cannot evaluate node {node.format_node()}")

    def run(
        self,
        flat_batches: list[list[Any]],
        on_site: SiteHook | None = None,
        stop_after: fx.Node | None = None,
        on_output: Callable[[fx.Node, list[Any]], None] | None = None,
    ) -> list[Any] | None:
        """Run every batch; returns per-batch flat outputs (None when stopped early)."""
        env = self.start(flat_batches)
        out, _ = self.advance(env, len(flat_batches), 0, on_site=on_site, stop_at=stop_after, on_output=on_output)
        return out

    def start(self, flat_batches: list[list[Any]]) -> dict[fx.Node, list[Any]]:
        """A fresh environment: the placeholders bound to each batch's flat inputs."""
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        return {n: [fb[i] if i < len(fb) else None for fb in flat_batches] for i, n in enumerate(placeholders)}

    def advance(
        self,
        env: dict[fx.Node, list[Any]],
        nb: int,
        start: int,
        *,
        on_site: SiteHook | None = None,
        stop_at: fx.Node | None = None,
        execute_stop: bool = True,
        on_output: Callable[[fx.Node, list[Any]], None] | None = None,
    ) -> tuple[list[Any] | None, int]:
        """Evaluate nodes from index ``start`` in ``env`` (updated in place; values are freed after
        their last user). Stops after ``stop_at`` — or just before executing it, with its
        ``on_site`` hook called, when ``execute_stop`` is False. Returns ``(outputs, next index)``;
        outputs are per-batch flat outputs when the graph's output node was reached, else None."""

        def value(b: int) -> Callable[[fx.Node], Any]:
            return lambda a: env[a][b] if a in self.batch_dependent else self._const(a)

        for i in range(start, len(self.nodes)):
            node = self.nodes[i]
            if node.op == "placeholder" or node not in self.batch_dependent:
                continue
            if node.op == "output":
                return [fx.node.map_arg(node.args[0], value(b)) for b in range(nb)], i + 1
            site = self.site_of_node.get(node)
            if site is not None and on_site is not None:
                for s in self.sites_of_node[node]:
                    on_site(node, s, self._site_inputs(node, s, value, nb))
            if node is stop_at and not execute_stop:
                return None, i
            outs = []
            for b in range(nb):
                getter = value(b)
                try:
                    outs.append(self._call(node, fx.node.map_arg(node.args, getter), fx.node.map_arg(node.kwargs, getter)))
                except MoonshotError:
                    raise
                except Exception as exc:  # a batch the traced graph cannot run: say which and why
                    raise CalibrationError(
                        f"running graph node {node.name!r} ({node.target}) failed on a calibration batch: "
                        f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}. "
                        "Check that every batch has the same structure, dtypes and feature sizes as example_inputs."
                    ) from exc
            env[node] = outs
            if on_output is not None and site is not None:
                on_output(node, outs)
            for a in node.all_input_nodes:
                if self.last_use.get(a) == i and a in env and a.op != "placeholder":
                    del env[a]
            if node is stop_at:
                return None, i + 1
        return None, len(self.nodes)

    def site_nodes(self) -> list[fx.Node]:
        """The nodes that use one of the runner's sites, in graph order."""
        return [n for n in self.nodes if n in self.site_of_node]

    def block_segments(self) -> list[list[fx.Node]]:
        """The site nodes split into repeated-block segments (:func:`.partition.segments`): graph
        order, a group never split across two segments."""
        nodes = self.site_nodes()
        by_name = {n.name: n for n in nodes}
        segs = segments([n.name for n in nodes], {n.name: block_key(self.site_of_node[n].name) for n in nodes},
                        {n.name: self.site_of_node[n].group for n in nodes})
        return [[by_name[name] for name in seg] for seg in segs]

    def last_site_node(self) -> fx.Node | None:
        """The last node (in graph order) that uses one of the runner's sites."""
        nodes = self.site_nodes()
        return nodes[-1] if nodes else None

"""Layer probing: which nodes of a backbone one can embed from, and what each gives.

Research users ask *which layer* carries the signal before anything else. :func:`list_layers`
answers what can be asked: every block of the network (or, with ``all_nodes``, every graph
node torchvision's ``get_graph_node_names`` traces), in forward order, with its output shape
for one image at the backbone's input size and the width of its pooled embedding. Any name
listed is a valid ``--layer``: a block name stands for its last node, as torchvision's
``create_feature_extractor`` resolves it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from featgender.backbones import get_config, network_with_weights, pooled


@dataclass(frozen=True)
class LayerInfo:
    """One embeddable node: its name (for ``--layer``), its output shape for one image, the
    width of its embedding (global-average pooled and flattened), and whether it is the
    backbone's default embedding layer."""

    name: str
    shape: tuple[int, ...]
    feature_dim: int
    default: bool


def list_layers(name: str, *, all_nodes: bool = False) -> list[LayerInfo]:
    """The nodes of backbone ``name`` one can embed from, in forward order: its blocks (names cut
    to two components, e.g. ``layer4.1``, ``features.12``, ``blocks.13``), or with
    ``all_nodes`` every traced node. Shapes come from one forward pass of a randomly
    initialised network (no weights file needed).

    >>> [layer.name for layer in list_layers("resnet18")][-4:]  # doctest: +SKIP
    ['layer4.1', 'avgpool', 'flatten', 'fc']
    """
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    config = get_config(name)
    network, _ = network_with_weights(config, "none")
    network.eval()
    nodes = get_graph_node_names(network, suppress_diff_warning=True)[1][1:]  # the first is the input itself
    names = nodes if all_nodes else _blocks(nodes, config.layer)
    extractor = create_feature_extractor(
        network, return_nodes={node: node for node in names}, suppress_diff_warning=True
    )
    with torch.inference_mode():
        outputs = extractor(torch.zeros(2, 3, config.input_size, config.input_size))
    return [
        LayerInfo(node, tuple(output.shape[1:]), pooled(output).shape[1], node == config.layer)
        for node, output in outputs.items()
        if isinstance(output, torch.Tensor) and output.ndim >= 2 and output.shape[0] == 2  # per image
    ]


def _blocks(nodes: list[str], default: str) -> list[str]:
    """``nodes`` cut to their first two name components, each once, in forward order; the
    default layer kept as it is named."""
    blocks: list[str] = []
    for node in nodes:
        block = node if node == default else ".".join(node.split(".")[:2])
        if block not in blocks:
            blocks.append(block)
    return blocks


__all__ = ["LayerInfo", "list_layers"]

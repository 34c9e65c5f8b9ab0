"""PoseNFS: backbone -> 4-scale pyramid -> P part fabrics -> vector heads -> joint scores.

    images [N, 3, H, W] -> scores [N, K, H/4, W/4]

Each part p (Table I grouping, or ``model.custom_parts``) maps every pyramid level to C*s
channels with its own 1x1 conv (skipped where the channels already match), runs its
6-cell fabric (own alpha, own betas), and predicts J_p*d channels; the squashed scores of
its joints are added into the K-joint map, so a joint in several parts (P=8) gets the sum
of their scores (range [0, 2) there, [0, 1) otherwise).

Training asks for the vectors instead, ``model(images, vectors=True)`` -> [N, sum_p J_p*d,
H/4, W/4] (the parts' vectors in part order, joint ``vector_joints[i]`` in channels i*d ..
i*d+d-1), when every joint is in exactly one part: the loss then squashes them itself
(:mod:`pnfs.loss`, docs/design.md §2). The forward is the same up to the last step.
"""

from __future__ import annotations

from collections.abc import Sequence
from copy import deepcopy

import torch
from torch import nn

from pnfs.config import Config
from pnfs.kernels import squash_score
from pnfs.model.backbones import Backbone, FabricBackbone, build_backbone
from pnfs.model.baseline import BaselinePoseNet
from pnfs.model.batched import BatchedCell, BatchedFabric, BatchedParts
from pnfs.model.cell import Cell
from pnfs.model.fabric import Fabric
from pnfs.model.hrnet import hrnet_w32
from pnfs.model.part import PartNetwork
from pnfs.model.simple_baseline import simple_baseline_resnet50


class PoseNFS(nn.Module):
    """The Pose Neural Fabrics Search model (paper Fig. 2)."""

    joint_index: torch.Tensor  # buffer [sum_p J_p]: the joint of each part's score channel, in part order

    def __init__(
        self,
        backbone: Backbone,
        parts: Sequence[Sequence[int]],
        part_names: Sequence[str],
        joint_names: Sequence[str],
        channels: int,
        hidden_nodes: int,
        ops: Sequence[str],
        vector_dim: int,
        batched_parts: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_joints = len(joint_names)
        self.joint_names = list(joint_names)
        self.part_names = list(part_names)
        self.part_joints = [list(p) for p in parts]
        self.vector_dim = vector_dim
        order = [j for p in self.part_joints for j in p]
        # the joint of each vector of forward(vectors=True); None when some joint is in several parts or none
        self.vector_joints = order if sorted(order) == list(range(self.num_joints)) else None
        self.part_structure = (list(backbone.channels), channels, hidden_nodes, list(ops))
        self.batched_parts = batched_parts
        self.parts = self._build_parts(batched_parts)
        for k, joints in enumerate(self.part_joints):
            self.register_buffer(f"joint_index_{k}", torch.tensor(joints, dtype=torch.long), persistent=False)
        self.register_buffer("joint_index", torch.tensor(order, dtype=torch.long), persistent=False)

    def _build_parts(self, batched: bool) -> BatchedParts | nn.ModuleList:
        pyramid_channels, channels, hidden_nodes, ops = self.part_structure
        joints = [len(p) for p in self.part_joints]
        if batched:
            return BatchedParts(pyramid_channels, channels, hidden_nodes, ops, joints, self.vector_dim)
        return nn.ModuleList(
            PartNetwork(pyramid_channels, channels, hidden_nodes, ops, j, self.vector_dim) for j in joints
        )

    def with_part_layout(self, batched: bool) -> PoseNFS:
        """A copy of this model with the parts batched (:class:`pnfs.model.batched.BatchedParts`)
        or per part (an ``nn.ModuleList`` of :class:`PartNetwork`): the same weights, buffers and
        mode, on the same device. Code that walks ``model.parts`` one part at a time (``pnfs.deploy``)
        takes ``with_part_layout(False)``."""
        copy = deepcopy(self)
        if batched != self.batched_parts:
            with torch.random.fork_rng(devices=[]):
                copy.parts = self._build_parts(batched)
            copy.batched_parts = batched
            copy.load_state_dict(self.state_dict())
            copy.to(next(self.parameters()).device)
            copy.train(self.training)
        return copy

    def part_networks(self) -> list[PartNetwork]:
        """The per-part networks in part order (the per-part layout; none when batched)."""
        return [part for part in self.parts if isinstance(part, PartNetwork)]

    def forward(self, images: torch.Tensor, vectors: bool = False) -> torch.Tensor:
        """images [N, 3, H, W] -> scores [N, K, H/4, W/4], joints in several parts summed;
        ``vectors``: the parts' vectors [N, K*d, H/4, W/4] (only where ``vector_joints`` is set)."""
        if vectors and self.vector_joints is None:
            raise ValueError("PoseNFS: vectors=True needs every joint in exactly one part (not P=8)")
        pyramid = self.backbone(images)
        if isinstance(self.parts, BatchedParts):
            all_vectors = self.parts.vectors(pyramid)
            if vectors:
                return all_vectors
            all_scores = squash_score(all_vectors, self.vector_dim)
            n, _, h, w = all_scores.shape
            return all_scores.new_zeros(n, self.num_joints, h, w).index_add(1, self.joint_index, all_scores)
        part_vectors = [part.vectors(pyramid) for part in self.part_networks()]
        if vectors:
            return torch.cat(part_vectors, dim=1)
        scores: torch.Tensor | None = None
        for k, v in enumerate(part_vectors):
            part_scores = squash_score(v, self.vector_dim)
            if scores is None:
                n, _, h, w = part_scores.shape
                scores = part_scores.new_zeros(n, self.num_joints, h, w)
            scores = scores.index_add(1, getattr(self, f"joint_index_{k}"), part_scores)
        if scores is None:
            raise ValueError("PoseNFS: no parts")
        return scores

    def arch_parameters(self) -> list[nn.Parameter]:
        """Every alpha (one per fabric) and beta (one per cell), part fabrics and Fabric backbone."""
        params = []
        for module in self.modules():
            if isinstance(module, (Fabric, BatchedFabric)):
                params.append(module.alpha)
            elif isinstance(module, (Cell, BatchedCell)) and module.beta is not None:
                params.append(module.beta)
        return params

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every parameter that is not an architecture parameter."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def architecture(self) -> dict:
        """The learnt architecture, JSON-ready: softmax(alpha) [edge][op] and softmax(beta)
        per cell (order finer, same, coarser) for every part and the Fabric backbone (or None)."""
        parts = []
        for k, (name, joints) in enumerate(zip(self.part_names, self.part_joints)):
            fabric = (
                self.parts.fabric.architecture(k)
                if isinstance(self.parts, BatchedParts)
                else self.part_networks()[k].fabric.architecture()
            )
            parts.append(
                {
                    "name": name,
                    "joints": [self.joint_names[j] for j in joints],
                    "joint_indices": list(joints),
                    **fabric,
                }
            )
        backbone = self.backbone.fabric.architecture() if isinstance(self.backbone, FabricBackbone) else None
        return {"parts": parts, "backbone": backbone}


def batched_parts(cfg: Config) -> bool:
    """``model.batched_parts`` resolved: ``auto`` batches the parts where training runs on CUDA
    (``train.device`` cuda, or auto with a GPU present), where launches bound the step."""
    choice = cfg.model.batched_parts
    if choice != "auto":
        return choice
    return cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())


def build_model(cfg: Config) -> PoseNFS | BaselinePoseNet:
    """The model of a validated config: ``model.name`` pnfs (a PoseNFS) or a Table VI baseline."""
    m = cfg.model
    if m.name == "simplebaseline_resnet50":
        return simple_baseline_resnet50(cfg.joints.joints, m.vector_dim)
    if m.name == "hrnet_w32":
        return hrnet_w32(cfg.joints.joints, m.vector_dim)
    parts = cfg.parts
    return PoseNFS(
        backbone=build_backbone(m.backbone),
        parts=parts,
        part_names=list(cfg.part_names),
        joint_names=cfg.joints.joints,
        channels=m.channels,
        hidden_nodes=m.hidden_nodes,
        ops=m.ops,
        vector_dim=m.vector_dim,
        batched_parts=batched_parts(cfg),
    )

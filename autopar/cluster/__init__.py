"""Cluster declarations: device kinds, links, presets and the :class:`Cluster` built from them.

Public API (what other packages import from here):

* :class:`Cluster` (``Cluster.preset``, ``Cluster.parse``, ``Cluster.from_yaml``, ``Cluster.local``),
  :class:`NodeGroup`;
* :class:`DeviceSpec`, :class:`Link`, the tables :data:`DEVICES` and :data:`PRESETS`
  (:mod:`autopar.cluster.hardware`, every constant with its source);
* :mod:`autopar.cluster.schema`: parsing and validating the YAML/JSON/CLI forms; ``device_line`` and
  ``link_line`` (the rows of ``Cluster.describe()``).

Nothing here imports torch.
"""

from __future__ import annotations

from autopar.cluster.cluster import Cluster, NodeGroup
from autopar.cluster.hardware import DEVICES, PRESETS, DeviceSpec, Link

__all__ = ["DEVICES", "PRESETS", "Cluster", "DeviceSpec", "Link", "NodeGroup"]

"""Test configuration: keep runs deterministic and single-threaded enough for a 2-core machine."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))  # the registry and shared test helpers
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

"""The process Flower starts for every message stays thin: no torch, transformers, PEFT or Opacus.

With the site's warm worker, that process only builds a request and forwards it; importing the
training stack there costs seconds per message (it did, through the request type, until this test).
"""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from collections import OrderedDict
import numpy as np
from flwr.app import Context, RecordDict
import fedtune.client.app as app
import fedtune.client.secure_agg
import fedtune.client.worker
context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
request = app._request(context, "train", {}, OrderedDict(a=np.zeros(2)), {"server-round": 1})
assert request.kind == "train"
print(",".join(sorted(m for m in ("torch", "transformers", "peft", "opacus") if m in sys.modules)))
"""


def test_building_and_forwarding_a_request_imports_no_training_stack() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "", f"heavy modules imported: {result.stdout.strip()}"

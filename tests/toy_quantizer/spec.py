"""The toy's spec: what a new family appends to ``tests/_specs.py`` (the lines after the
marker below)."""

import vqfast
from _specs import SPECS, Spec

# --- appended to tests/_specs.py ---
SPECS.append(Spec(vqfast.ChannelGridQuantizer,
                  lambda b: vqfast.ChannelGridQuantizer(4, 3, backend=b), 3, "channel_grid",
                  "test_toy_quantizer.py", loss=False, learned=False))

"""The one exception type of la-seg: bad input that the user can fix.

`la-seg` turns it into one `la-seg: error: ...` line and exit status 2, so every message names the file or
option and what is wrong with it.
"""

from __future__ import annotations

import re


class DataError(ValueError):
    """Bad input data or settings: the message names the file or field and what is wrong with it."""


# The command-line option that sets each argument of la-seg's networks (la_seg.models): the models raise
# ValueErrors about their own arguments (`groups=4 ...`) and know nothing of the command line.
NETWORK_OPTIONS = {
    "groups": "model.net.fusion_groups",  # BlockFusion's
    "fusion_groups": "model.net.fusion_groups",
    "mode": "model.net.fusion",  # BlockFusion's
    "decoder_channels": "model.net.decoder_channels",
    "indices": "model.net.indices",
    "trainable_blocks": "model.net.trainable_blocks",
    "model_kwargs": "model.net.backbone_kwargs",  # DINOBackbone's
    "pretrained": "model.net.pretrained",
    "img_size": "data.img_size",  # linked to model.net.img_size
}
_ARGUMENT = re.compile(rf"(?<![\w.])({'|'.join(NETWORK_OPTIONS)})(?=\s*[<>]?=|\))")


def naming_options(error: ValueError) -> DataError:
    """A network's ValueError as the user-facing DataError, each argument it names as `name=value`,
    `name <= n` or `len(name)` replaced by the option that sets it (NETWORK_OPTIONS)."""
    return DataError(_ARGUMENT.sub(lambda match: NETWORK_OPTIONS[match.group(1)], str(error)))

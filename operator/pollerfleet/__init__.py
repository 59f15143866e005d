"""PollerFleet operator: `kopf run -m pollerfleet`.

Importing the package registers the handlers.
"""

from . import handlers  # noqa: F401

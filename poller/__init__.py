"""Sound Check poller: pings monitoring targets on their cadence and records samples."""

__version__ = "0.2.0"

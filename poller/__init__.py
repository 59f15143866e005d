"""Sound Check poller: pings monitoring targets on their cadence and records samples."""

__version__ = "0.1.0"

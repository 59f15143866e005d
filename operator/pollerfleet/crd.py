"""The PollerFleet custom resource's coordinates, written once (crds/pollerfleet.yaml says
the same; tests/test_fleet_logic.py holds the two equal)."""

GROUP = "soundcheck.io"
VERSION = "v1alpha1"
PLURAL = "pollerfleets"

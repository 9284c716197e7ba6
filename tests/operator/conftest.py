"""Fixtures of the operator tests: the Kubernetes doubles live in k8s_doubles.py (the API
server: kmock's emulator and where and why its semantics were extended) and
local_kubelet.py (pods run as local processes); k8s_fixtures.py wraps them as fixtures."""

from k8s_fixtures import *  # noqa: F403

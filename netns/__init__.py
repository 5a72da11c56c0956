"""The lab: network namespaces, veth pairs, packet drivers, real clients and servers."""

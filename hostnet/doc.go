// Package hostnet sets up the host plumbing that lets a userspace MPTCP stack
// reach the world through the kernel without the kernel owning any of its TCP
// connections: one TUN device per uplink, policy routing that sends whatever
// the stack writes into a TUN out of that TUN's uplink, and nftables NAT (SNAT
// for outgoing subflows, DNAT of a service port for incoming ones). The kernel
// only routes and NATs, so it never answers the stack's segments with RSTs.
//
// Everything is made through netlink (github.com/vishvananda/netlink) and
// nf_tables (github.com/google/nftables) rather than by running ip or nft, and
// everything made is recorded so Close removes it again, also after a failed
// Setup.
package hostnet

package mptcpep

// Sequence-number helpers for the two number spaces of an MPTCP connection.
//
// Data sequence numbers (DSN) are 64 bits. A connection never sends 2^63
// bytes, but the initial DSN is derived from a random key (RFC 8684 §3.1),
// so the stream may well cross 2^64 -> 0. All DSN comparisons therefore use
// the signed distance (serial-number arithmetic, RFC 1982) and are valid
// as long as the two values are less than 2^63 apart, which always holds
// for values within one connection.
//
// Subflow sequence numbers (SSN) in DSS mappings are 32 bits, relative to
// the subflow's initial sequence number, and wrap after 4 GiB; they are
// compared the same way with a 2^31 horizon, as in TCP.

// expandDSN32 returns the 64-bit DSN whose low 32 bits are v and that is
// closest to near. RFC 8684 §3.3 lets a sender put 32-bit DSNs and
// DATA_ACKs in a DSS option; the receiver infers the upper bits from the
// values it already knows (its rcv_nxt for a DSN, its snd_una for a
// DATA_ACK). Ties (exactly 2^31 away) resolve downwards.
func expandDSN32(v uint32, near uint64) uint64 {
	// The signed 32-bit distance from the low half of near to v, applied
	// to near with 64-bit wrap-around.
	return near + uint64(int64(int32(v-uint32(near))))
}

// dsnLT reports whether a comes before b in DSN space.
func dsnLT(a, b uint64) bool { return int64(a-b) < 0 }

// dsnLEQ reports whether a comes before b or equals it.
func dsnLEQ(a, b uint64) bool { return int64(a-b) <= 0 }

// dsnDiff returns a-b as a signed distance.
func dsnDiff(a, b uint64) int64 { return int64(a - b) }

// ssnLT reports whether subflow sequence number a comes before b.
func ssnLT(a, b uint32) bool { return int32(a-b) < 0 }

// ssnLEQ reports whether subflow sequence number a comes before b or
// equals it.
func ssnLEQ(a, b uint32) bool { return int32(a-b) <= 0 }

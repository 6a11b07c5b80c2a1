// Package header implements the wire formats of the Multipath TCP options of
// RFC 8684 (MPTCP v1), in the spirit of gVisor's pkg/tcpip/header: pure
// encoding and decoding, no protocol logic, no allocations on the hot path.
//
// Every option type has a value-receiver Encode (writes Len() bytes) and a
// pointer-receiver Decode that parses without allocating. Parse and
// ParseMPTCP are convenience wrappers that box the result in an Option.
package header

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
)

// TCPOptionMPTCP is the TCP option kind assigned to Multipath TCP.
const TCPOptionMPTCP = 30

// TCP option kinds that WalkTCPOptions treats specially.
const (
	TCPOptionEOL = 0
	TCPOptionNOP = 1
)

// Version1 is the MPTCP version implemented by this package (RFC 8684).
const Version1 = 1

// Subtype is the MPTCP option subtype (upper nibble of the third byte).
type Subtype uint8

// MPTCP option subtypes, RFC 8684 section 8 (IANA registry).
const (
	SubtypeMPCapable   Subtype = 0
	SubtypeMPJoin      Subtype = 1
	SubtypeDSS         Subtype = 2
	SubtypeAddAddr     Subtype = 3
	SubtypeRemoveAddr  Subtype = 4
	SubtypeMPPrio      Subtype = 5
	SubtypeMPFail      Subtype = 6
	SubtypeMPFastclose Subtype = 7
	SubtypeMPTCPRst    Subtype = 8
	// SubtypeMPExperimental is reserved for private use; Parse rejects it.
	SubtypeMPExperimental Subtype = 0xf
)

var subtypeNames = [...]string{
	"MP_CAPABLE", "MP_JOIN", "DSS", "ADD_ADDR", "REMOVE_ADDR",
	"MP_PRIO", "MP_FAIL", "MP_FASTCLOSE", "MP_TCPRST",
}

func (s Subtype) String() string {
	if int(s) < len(subtypeNames) {
		return subtypeNames[s]
	}
	return fmt.Sprintf("MPTCP_SUBTYPE_%d", uint8(s))
}

// Sentinel errors. Parse wraps them with context; use errors.Is to classify
// (e.g. to count MIB counters per kind).
var (
	// ErrTruncated: the buffer ends before the length the option claims.
	ErrTruncated = errors.New("mptcp option truncated")
	// ErrBadLength: the length byte does not match any valid encoding.
	ErrBadLength = errors.New("mptcp option has invalid length")
	// ErrUnknownSubtype: a subtype this package does not implement.
	ErrUnknownSubtype = errors.New("unknown mptcp option subtype")
	// ErrBadVersion: an MP_CAPABLE with a version other than 1.
	ErrBadVersion = errors.New("unsupported mptcp version")
	// ErrBadFlags: MP_CAPABLE with the extensibility bit B set, which a v1
	// receiver must ignore (RFC 8684 3.1), i.e. treat as no MP_CAPABLE.
	ErrBadFlags = errors.New("unsupported mptcp option flags")
	// ErrNotMPTCP: the option kind is not TCPOptionMPTCP.
	ErrNotMPTCP = errors.New("not an mptcp option")
	// ErrMalformedOptions: a TCP options block with a bad kind/length layout.
	ErrMalformedOptions = errors.New("malformed tcp options")
)

// Option is one MPTCP option.
type Option interface {
	Subtype() Subtype
	// Len is the encoded length including the kind and length bytes.
	Len() int
	// Encode writes Len() bytes to b and returns Len(). It returns 0 and
	// writes nothing if b is too short or the value cannot be encoded.
	Encode(b []byte) int
}

// Encoded option lengths.
const (
	MPCapableSYNLen         = 4
	MPCapableSYNACKLen      = 12
	MPCapableACKLen         = 20
	MPCapableACKDataLen     = 22
	MPCapableACKDataCsumLen = 24
	MPJoinSYNLen            = 12
	MPJoinSYNACKLen         = 16
	MPJoinACKLen            = 24
	MPPrioLen               = 3
	MPFailLen               = 12
	MPFastcloseLen          = 12
	MPTCPRstLen             = 4
	// DSSMaxLen is the longest DSS: 64-bit DATA_ACK, 64-bit DSN, checksum.
	DSSMaxLen = 28
	// AddAddrMaxLen is ADD_ADDR with IPv6, port and HMAC.
	AddAddrMaxLen = 30
)

// SubtypeOf returns the subtype of the MPTCP option starting at b[0].
func SubtypeOf(b []byte) (Subtype, bool) {
	if len(b) < 3 || b[0] != TCPOptionMPTCP {
		return 0, false
	}
	return Subtype(b[2] >> 4), true
}

// optionBytes validates kind and length of b and returns the option's bytes
// (b cut to its length byte).
func optionBytes(b []byte, want Subtype) ([]byte, error) {
	if len(b) < 2 {
		return nil, fmt.Errorf("%v: %d bytes: %w", want, len(b), ErrTruncated)
	}
	if b[0] != TCPOptionMPTCP {
		return nil, fmt.Errorf("%v: kind %d: %w", want, b[0], ErrNotMPTCP)
	}
	l := int(b[1])
	if l < 3 {
		return nil, fmt.Errorf("%v: length %d: %w", want, l, ErrBadLength)
	}
	if l > len(b) {
		return nil, fmt.Errorf("%v: length %d, have %d bytes: %w", want, l, len(b), ErrTruncated)
	}
	if got := Subtype(b[2] >> 4); got != want {
		return nil, fmt.Errorf("%v: found subtype %v: %w", want, got, ErrUnknownSubtype)
	}
	return b[:l], nil
}

func putHeader(b []byte, l int, st Subtype, low uint8) {
	b[0] = TCPOptionMPTCP
	b[1] = uint8(l)
	b[2] = uint8(st)<<4 | low&0xf
}

func badLen(st Subtype, l int) error {
	return fmt.Errorf("%v: length %d: %w", st, l, ErrBadLength)
}

// MP_CAPABLE flag bits (RFC 8684 3.1).
const (
	MPCapableFlagA = 0x80 // checksum required
	MPCapableFlagB = 0x40 // extensibility, must be 0 in v1
	MPCapableFlagC = 0x20 // no more subflows to the source address/port
	MPCapableFlagH = 0x01 // HMAC-SHA256
)

// MPCapable is the MP_CAPABLE option (v1). The encoding is selected by
// NumKeys (0: SYN, 1: SYN/ACK, 2: ACK) and for the ACK by HasDataLen and
// HasChecksum.
type MPCapable struct {
	Version          uint8
	ChecksumRequired bool // A
	NoMoreSubflows   bool // C
	HMACSHA256       bool // H
	// Flags is the raw flag byte as received. On Encode the A, C and H bits
	// come from the booleans and B is always cleared; other bits are copied.
	Flags       uint8
	SenderKey   uint64
	ReceiverKey uint64
	NumKeys     int
	HasDataLen  bool
	DataLen     uint16
	HasChecksum bool
	Checksum    uint16
}

// Subtype implements Option.
func (MPCapable) Subtype() Subtype { return SubtypeMPCapable }

// Len implements Option.
func (o MPCapable) Len() int {
	switch {
	case o.NumKeys <= 0:
		return MPCapableSYNLen
	case o.NumKeys == 1:
		return MPCapableSYNACKLen
	case !o.HasDataLen:
		return MPCapableACKLen
	case !o.HasChecksum:
		return MPCapableACKDataLen
	default:
		return MPCapableACKDataCsumLen
	}
}

// Encode implements Option.
func (o MPCapable) Encode(b []byte) int {
	l := o.Len()
	if len(b) < l {
		return 0
	}
	putHeader(b, l, SubtypeMPCapable, o.Version)
	f := o.Flags &^ (MPCapableFlagA | MPCapableFlagB | MPCapableFlagC | MPCapableFlagH)
	if o.ChecksumRequired {
		f |= MPCapableFlagA
	}
	if o.NoMoreSubflows {
		f |= MPCapableFlagC
	}
	if o.HMACSHA256 {
		f |= MPCapableFlagH
	}
	b[3] = f
	if l >= MPCapableSYNACKLen {
		binary.BigEndian.PutUint64(b[4:], o.SenderKey)
	}
	if l >= MPCapableACKLen {
		binary.BigEndian.PutUint64(b[12:], o.ReceiverKey)
	}
	if l >= MPCapableACKDataLen {
		binary.BigEndian.PutUint16(b[20:], o.DataLen)
	}
	if l == MPCapableACKDataCsumLen {
		binary.BigEndian.PutUint16(b[22:], o.Checksum)
	}
	return l
}

// Decode parses an MP_CAPABLE option. Like Linux, a SYN (length 4) with a
// version above 1 is accepted (the responder answers with version 1); all
// other lengths require version 1. Version 0 (RFC 6824) is rejected.
func (o *MPCapable) Decode(b []byte) error {
	b, err := optionBytes(b, SubtypeMPCapable)
	if err != nil {
		return err
	}
	*o = MPCapable{Version: b[2] & 0xf}
	switch len(b) {
	case MPCapableSYNLen:
	case MPCapableSYNACKLen:
		o.NumKeys = 1
	case MPCapableACKLen:
		o.NumKeys = 2
	case MPCapableACKDataLen:
		o.NumKeys, o.HasDataLen = 2, true
	case MPCapableACKDataCsumLen:
		o.NumKeys, o.HasDataLen, o.HasChecksum = 2, true, true
	default:
		return badLen(SubtypeMPCapable, len(b))
	}
	if o.Version < Version1 || (o.Version != Version1 && len(b) != MPCapableSYNLen) {
		return fmt.Errorf("MP_CAPABLE: version %d: %w", o.Version, ErrBadVersion)
	}
	o.Flags = b[3]
	if o.Flags&MPCapableFlagB != 0 {
		return fmt.Errorf("MP_CAPABLE: flags %#02x: %w", o.Flags, ErrBadFlags)
	}
	o.ChecksumRequired = o.Flags&MPCapableFlagA != 0
	o.NoMoreSubflows = o.Flags&MPCapableFlagC != 0
	o.HMACSHA256 = o.Flags&MPCapableFlagH != 0
	if o.NumKeys >= 1 {
		o.SenderKey = binary.BigEndian.Uint64(b[4:])
	}
	if o.NumKeys == 2 {
		o.ReceiverKey = binary.BigEndian.Uint64(b[12:])
	}
	if o.HasDataLen {
		o.DataLen = binary.BigEndian.Uint16(b[20:])
	}
	if o.HasChecksum {
		o.Checksum = binary.BigEndian.Uint16(b[22:])
	}
	return nil
}

// MPJoinSYN is MP_JOIN on the initiator's SYN.
type MPJoinSYN struct {
	Backup bool
	AddrID uint8
	Token  uint32 // receiver's token
	Nonce  uint32 // sender's random number
}

// Subtype implements Option.
func (MPJoinSYN) Subtype() Subtype { return SubtypeMPJoin }

// Len implements Option.
func (MPJoinSYN) Len() int { return MPJoinSYNLen }

// Encode implements Option.
func (o MPJoinSYN) Encode(b []byte) int {
	if len(b) < MPJoinSYNLen {
		return 0
	}
	putHeader(b, MPJoinSYNLen, SubtypeMPJoin, boolBit(o.Backup))
	b[3] = o.AddrID
	binary.BigEndian.PutUint32(b[4:], o.Token)
	binary.BigEndian.PutUint32(b[8:], o.Nonce)
	return MPJoinSYNLen
}

// Decode parses an MP_JOIN of length 12.
func (o *MPJoinSYN) Decode(b []byte) error {
	b, err := optionBytes(b, SubtypeMPJoin)
	if err != nil {
		return err
	}
	if len(b) != MPJoinSYNLen {
		return badLen(SubtypeMPJoin, len(b))
	}
	*o = MPJoinSYN{
		Backup: b[2]&1 != 0,
		AddrID: b[3],
		Token:  binary.BigEndian.Uint32(b[4:]),
		Nonce:  binary.BigEndian.Uint32(b[8:]),
	}
	return nil
}

// MPJoinSYNACK is MP_JOIN on the responder's SYN/ACK.
type MPJoinSYNACK struct {
	Backup bool
	AddrID uint8
	HMAC   uint64 // leftmost 64 bits of the responder's HMAC
	Nonce  uint32
}

// Subtype implements Option.
func (MPJoinSYNACK) Subtype() Subtype { return SubtypeMPJoin }

// Len implements Option.
func (MPJoinSYNACK) Len() int { return MPJoinSYNACKLen }

// Encode implements Option.
func (o MPJoinSYNACK) Encode(b []byte) int {
	if len(b) < MPJoinSYNACKLen {
		return 0
	}
	putHeader(b, MPJoinSYNACKLen, SubtypeMPJoin, boolBit(o.Backup))
	b[3] = o.AddrID
	binary.BigEndian.PutUint64(b[4:], o.HMAC)
	binary.BigEndian.PutUint32(b[12:], o.Nonce)
	return MPJoinSYNACKLen
}

// Decode parses an MP_JOIN of length 16.
func (o *MPJoinSYNACK) Decode(b []byte) error {
	b, err := optionBytes(b, SubtypeMPJoin)
	if err != nil {
		return err
	}
	if len(b) != MPJoinSYNACKLen {
		return badLen(SubtypeMPJoin, len(b))
	}
	*o = MPJoinSYNACK{
		Backup: b[2]&1 != 0,
		AddrID: b[3],
		HMAC:   binary.BigEndian.Uint64(b[4:]),
		Nonce:  binary.BigEndian.Uint32(b[12:]),
	}
	return nil
}

// MPJoinACK is MP_JOIN on the initiator's third ACK.
type MPJoinACK struct {
	HMAC [20]byte // leftmost 160 bits of the initiator's HMAC
}

// Subtype implements Option.
func (MPJoinACK) Subtype() Subtype { return SubtypeMPJoin }

// Len implements Option.
func (MPJoinACK) Len() int { return MPJoinACKLen }

// Encode implements Option.
func (o MPJoinACK) Encode(b []byte) int {
	if len(b) < MPJoinACKLen {
		return 0
	}
	putHeader(b, MPJoinACKLen, SubtypeMPJoin, 0)
	b[3] = 0
	copy(b[4:24], o.HMAC[:])
	return MPJoinACKLen
}

// Decode parses an MP_JOIN of length 24.
func (o *MPJoinACK) Decode(b []byte) error {
	b, err := optionBytes(b, SubtypeMPJoin)
	if err != nil {
		return err
	}
	if len(b) != MPJoinACKLen {
		return badLen(SubtypeMPJoin, len(b))
	}
	copy(o.HMAC[:], b[4:24])
	return nil
}

// DSS flag bits (RFC 8684 3.3).
const (
	DSSFlagDataAck   = 0x01 // A
	DSSFlagDataAck64 = 0x02 // a
	DSSFlagMapping   = 0x04 // M
	DSSFlagDSN64     = 0x08 // m
	DSSFlagDataFin   = 0x10 // F
)

// DSS is the Data Sequence Signal option. A 32-bit DataAck or DSN is
// carried in the low 32 bits of the uint64 fields.
type DSS struct {
	HasDataAck  bool
	DataAck64   bool
	DataAck     uint64
	HasMapping  bool
	DSN64       bool
	DSN         uint64
	SSN         uint32 // relative subflow sequence number
	DataLen     uint16
	HasChecksum bool // only meaningful with HasMapping
	Checksum    uint16
	DataFin     bool
}

// Subtype implements Option.
func (DSS) Subtype() Subtype { return SubtypeDSS }

// dssLen is the encoded length implied by the flags, without checksum.
func dssLen(flags uint8) int {
	l := 4
	if flags&DSSFlagDataAck != 0 {
		l += 4
		if flags&DSSFlagDataAck64 != 0 {
			l += 4
		}
	}
	if flags&DSSFlagMapping != 0 {
		l += 4 + 4 + 2
		if flags&DSSFlagDSN64 != 0 {
			l += 4
		}
	}
	return l
}

func (o DSS) flags() uint8 {
	var f uint8
	if o.HasDataAck {
		f |= DSSFlagDataAck
		if o.DataAck64 {
			f |= DSSFlagDataAck64
		}
	}
	if o.HasMapping {
		f |= DSSFlagMapping
		if o.DSN64 {
			f |= DSSFlagDSN64
		}
	}
	if o.DataFin {
		f |= DSSFlagDataFin
	}
	return f
}

// Len implements Option.
func (o DSS) Len() int {
	l := dssLen(o.flags())
	if o.HasMapping && o.HasChecksum {
		l += 2
	}
	return l
}

// Encode implements Option.
func (o DSS) Encode(b []byte) int {
	f := o.flags()
	l := dssLen(f)
	withCsum := o.HasMapping && o.HasChecksum
	if withCsum {
		l += 2
	}
	if len(b) < l {
		return 0
	}
	putHeader(b, l, SubtypeDSS, 0)
	b[3] = f
	i := 4
	if o.HasDataAck {
		if o.DataAck64 {
			binary.BigEndian.PutUint64(b[i:], o.DataAck)
			i += 8
		} else {
			binary.BigEndian.PutUint32(b[i:], uint32(o.DataAck))
			i += 4
		}
	}
	if o.HasMapping {
		if o.DSN64 {
			binary.BigEndian.PutUint64(b[i:], o.DSN)
			i += 8
		} else {
			binary.BigEndian.PutUint32(b[i:], uint32(o.DSN))
			i += 4
		}
		binary.BigEndian.PutUint32(b[i:], o.SSN)
		binary.BigEndian.PutUint16(b[i+4:], o.DataLen)
		i += 6
		if withCsum {
			binary.BigEndian.PutUint16(b[i:], o.Checksum)
		}
	}
	return l
}

// Decode parses a DSS option. Checksum presence is taken from the length,
// as Linux does: with a mapping, both the length implied by the flags and
// that length + 2 are accepted (the caller enforces RFC 8684 3.3.0, i.e.
// resets a subflow whose checksum presence does not match the handshake).
// Without a mapping the length must match the flags exactly.
func (o *DSS) Decode(b []byte) error {
	b, err := optionBytes(b, SubtypeDSS)
	if err != nil {
		return err
	}
	if len(b) < 4 {
		return badLen(SubtypeDSS, len(b))
	}
	f := b[3]
	want := dssLen(f)
	switch {
	case len(b) == want:
		*o = DSS{}
	case len(b) == want+2 && f&DSSFlagMapping != 0:
		*o = DSS{HasChecksum: true}
	default:
		return fmt.Errorf("DSS: flags %#02x length %d (want %d): %w", f, len(b), want, ErrBadLength)
	}
	o.DataFin = f&DSSFlagDataFin != 0
	i := 4
	if f&DSSFlagDataAck != 0 {
		o.HasDataAck = true
		if f&DSSFlagDataAck64 != 0 {
			o.DataAck64 = true
			o.DataAck = binary.BigEndian.Uint64(b[i:])
			i += 8
		} else {
			o.DataAck = uint64(binary.BigEndian.Uint32(b[i:]))
			i += 4
		}
	}
	if f&DSSFlagMapping != 0 {
		o.HasMapping = true
		if f&DSSFlagDSN64 != 0 {
			o.DSN64 = true
			o.DSN = binary.BigEndian.Uint64(b[i:])
			i += 8
		} else {
			o.DSN = uint64(binary.BigEndian.Uint32(b[i:]))
			i += 4
		}
		o.SSN = binary.BigEndian.Uint32(b[i:])
		o.DataLen = binary.BigEndian.Uint16(b[i+4:])
		i += 6
		if o.HasChecksum {
			o.Checksum = binary.BigEndian.Uint16(b[i:])
		}
	}
	return nil
}

// AddAddr is the ADD_ADDR option. Port 0 means the port is absent (RFC 8684
// forbids announcing port 0). HMAC is absent when Echo is set.
type AddAddr struct {
	Echo   bool
	AddrID uint8
	Addr   netip.Addr
	Port   uint16
	HMAC   uint64 // rightmost 64 bits of the HMAC (RFC 8684 3.4.1)
}

// Subtype implements Option.
func (AddAddr) Subtype() Subtype { return SubtypeAddAddr }

// Len implements Option. An IPv4-mapped IPv6 address is sent as IPv6.
func (o AddAddr) Len() int {
	l := 4 + 4
	if o.Addr.Is6() {
		l = 4 + 16
	}
	if o.Port != 0 {
		l += 2
	}
	if !o.Echo {
		l += 8
	}
	return l
}

// Encode implements Option. It returns 0 for an invalid (zero) Addr.
func (o AddAddr) Encode(b []byte) int {
	l := o.Len()
	if len(b) < l || !o.Addr.IsValid() {
		return 0
	}
	putHeader(b, l, SubtypeAddAddr, boolBit(o.Echo))
	b[3] = o.AddrID
	i := 4
	if o.Addr.Is4() {
		a := o.Addr.As4()
		i += copy(b[i:], a[:])
	} else {
		a := o.Addr.As16()
		i += copy(b[i:], a[:])
	}
	if o.Port != 0 {
		binary.BigEndian.PutUint16(b[i:], o.Port)
		i += 2
	}
	if !o.Echo {
		binary.BigEndian.PutUint64(b[i:], o.HMAC)
	}
	return l
}

// Decode parses an ADD_ADDR; the address family follows from the length
// and the E flag, which is unambiguous in v1.
func (o *AddAddr) Decode(b []byte) error {
	b, err := optionBytes(b, SubtypeAddAddr)
	if err != nil {
		return err
	}
	if len(b) < 8 {
		return badLen(SubtypeAddAddr, len(b))
	}
	*o = AddAddr{Echo: b[2]&1 != 0, AddrID: b[3]}
	rest := len(b) - 4
	if !o.Echo {
		rest -= 8
	}
	var alen int
	switch rest {
	case 4, 6:
		alen = 4
	case 16, 18:
		alen = 16
	default:
		return badLen(SubtypeAddAddr, len(b))
	}
	if alen == 4 {
		o.Addr = netip.AddrFrom4([4]byte(b[4:8]))
	} else {
		o.Addr = netip.AddrFrom16([16]byte(b[4:20]))
	}
	i := 4 + alen
	if rest == alen+2 {
		o.Port = binary.BigEndian.Uint16(b[i:])
		i += 2
		if o.Port == 0 {
			// A present port of 0 cannot be told apart from "absent" in
			// this representation and is meaningless on the wire.
			return fmt.Errorf("ADD_ADDR: port 0: %w", ErrBadLength)
		}
	}
	if !o.Echo {
		o.HMAC = binary.BigEndian.Uint64(b[i:])
	}
	return nil
}

// RemoveAddr is the REMOVE_ADDR option with at least one address ID.
type RemoveAddr struct {
	AddrIDs []uint8
}

// Subtype implements Option.
func (RemoveAddr) Subtype() Subtype { return SubtypeRemoveAddr }

// Len implements Option.
func (o RemoveAddr) Len() int { return 3 + len(o.AddrIDs) }

// Encode implements Option. It returns 0 for an empty list or more IDs than
// fit in a TCP option.
func (o RemoveAddr) Encode(b []byte) int {
	l := o.Len()
	if len(o.AddrIDs) == 0 || l > 40 || len(b) < l {
		return 0
	}
	putHeader(b, l, SubtypeRemoveAddr, 0)
	copy(b[3:], o.AddrIDs)
	return l
}

// Decode parses a REMOVE_ADDR. AddrIDs aliases b (no allocation); copy it
// if b is reused.
func (o *RemoveAddr) Decode(b []byte) error {
	b, err := optionBytes(b, SubtypeRemoveAddr)
	if err != nil {
		return err
	}
	// At least one ID; at most what fits in the 40 bytes of TCP options.
	if len(b) < 4 || len(b) > 40 {
		return badLen(SubtypeRemoveAddr, len(b))
	}
	o.AddrIDs = b[3:]
	return nil
}

// MPPrio is the v1 MP_PRIO option (length 3, no address ID).
type MPPrio struct {
	Backup bool
}

// Subtype implements Option.
func (MPPrio) Subtype() Subtype { return SubtypeMPPrio }

// Len implements Option.
func (MPPrio) Len() int { return MPPrioLen }

// Encode implements Option.
func (o MPPrio) Encode(b []byte) int {
	if len(b) < MPPrioLen {
		return 0
	}
	putHeader(b, MPPrioLen, SubtypeMPPrio, boolBit(o.Backup))
	return MPPrioLen
}

// Decode parses MP_PRIO; like Linux only the v1 length 3 is accepted.
func (o *MPPrio) Decode(b []byte) error {
	b, err := optionBytes(b, SubtypeMPPrio)
	if err != nil {
		return err
	}
	if len(b) != MPPrioLen {
		return badLen(SubtypeMPPrio, len(b))
	}
	o.Backup = b[2]&1 != 0
	return nil
}

// MPFail is the MP_FAIL option.
type MPFail struct {
	DSN uint64
}

// Subtype implements Option.
func (MPFail) Subtype() Subtype { return SubtypeMPFail }

// Len implements Option.
func (MPFail) Len() int { return MPFailLen }

// Encode implements Option.
func (o MPFail) Encode(b []byte) int {
	if len(b) < MPFailLen {
		return 0
	}
	putHeader(b, MPFailLen, SubtypeMPFail, 0)
	b[3] = 0
	binary.BigEndian.PutUint64(b[4:], o.DSN)
	return MPFailLen
}

// Decode parses MP_FAIL.
func (o *MPFail) Decode(b []byte) error {
	b, err := optionBytes(b, SubtypeMPFail)
	if err != nil {
		return err
	}
	if len(b) != MPFailLen {
		return badLen(SubtypeMPFail, len(b))
	}
	o.DSN = binary.BigEndian.Uint64(b[4:])
	return nil
}

// MPFastclose is the MP_FASTCLOSE option.
type MPFastclose struct {
	ReceiverKey uint64
}

// Subtype implements Option.
func (MPFastclose) Subtype() Subtype { return SubtypeMPFastclose }

// Len implements Option.
func (MPFastclose) Len() int { return MPFastcloseLen }

// Encode implements Option.
func (o MPFastclose) Encode(b []byte) int {
	if len(b) < MPFastcloseLen {
		return 0
	}
	putHeader(b, MPFastcloseLen, SubtypeMPFastclose, 0)
	b[3] = 0
	binary.BigEndian.PutUint64(b[4:], o.ReceiverKey)
	return MPFastcloseLen
}

// Decode parses MP_FASTCLOSE.
func (o *MPFastclose) Decode(b []byte) error {
	b, err := optionBytes(b, SubtypeMPFastclose)
	if err != nil {
		return err
	}
	if len(b) != MPFastcloseLen {
		return badLen(SubtypeMPFastclose, len(b))
	}
	o.ReceiverKey = binary.BigEndian.Uint64(b[4:])
	return nil
}

// MP_TCPRST reason codes (RFC 8684 3.6).
const (
	RstReasonUnspecified        = 0x00
	RstReasonMPTCPError         = 0x01
	RstReasonLackOfResources    = 0x02
	RstReasonAdminProhibited    = 0x03
	RstReasonTooMuchOutstanding = 0x04
	RstReasonUnacceptablePerf   = 0x05
	RstReasonMiddlebox          = 0x06
)

// MPTCPRst is the MP_TCPRST option. The reserved U, V, W flag bits are
// ignored on Decode and sent as zero.
type MPTCPRst struct {
	Transient bool // T
	Reason    uint8
}

// Subtype implements Option.
func (MPTCPRst) Subtype() Subtype { return SubtypeMPTCPRst }

// Len implements Option.
func (MPTCPRst) Len() int { return MPTCPRstLen }

// Encode implements Option.
func (o MPTCPRst) Encode(b []byte) int {
	if len(b) < MPTCPRstLen {
		return 0
	}
	putHeader(b, MPTCPRstLen, SubtypeMPTCPRst, boolBit(o.Transient))
	b[3] = o.Reason
	return MPTCPRstLen
}

// Decode parses MP_TCPRST.
func (o *MPTCPRst) Decode(b []byte) error {
	b, err := optionBytes(b, SubtypeMPTCPRst)
	if err != nil {
		return err
	}
	if len(b) != MPTCPRstLen {
		return badLen(SubtypeMPTCPRst, len(b))
	}
	*o = MPTCPRst{Transient: b[2]&1 != 0, Reason: b[3]}
	return nil
}

func boolBit(v bool) uint8 {
	if v {
		return 1
	}
	return 0
}

// Parse decodes one MPTCP option; b starts at the kind byte and b[1] is its
// length (bytes after it are ignored). MP_JOIN is told apart by length
// (12: SYN, 16: SYN/ACK, 24: ACK). The result is a value type (MPCapable,
// MPJoinSYN, ..., DSS); RemoveAddr.AddrIDs is a copy. Parse allocates for
// the interface; hot paths should use SubtypeOf and the Decode methods.
func Parse(b []byte) (Option, error) {
	st, ok := SubtypeOf(b)
	if !ok {
		// Let optionBytes produce the precise error.
		_, err := optionBytes(b, SubtypeMPCapable)
		if err == nil {
			err = ErrTruncated
		}
		return nil, err
	}
	switch st {
	case SubtypeMPCapable:
		var o MPCapable
		err := o.Decode(b)
		return decoded(o, err)
	case SubtypeMPJoin:
		switch b[1] {
		case MPJoinSYNLen:
			var o MPJoinSYN
			err := o.Decode(b)
			return decoded(o, err)
		case MPJoinSYNACKLen:
			var o MPJoinSYNACK
			err := o.Decode(b)
			return decoded(o, err)
		case MPJoinACKLen:
			var o MPJoinACK
			err := o.Decode(b)
			return decoded(o, err)
		default:
			// Still check truncation first so errors are precise.
			if _, err := optionBytes(b, SubtypeMPJoin); err != nil {
				return nil, err
			}
			return nil, badLen(SubtypeMPJoin, int(b[1]))
		}
	case SubtypeDSS:
		var o DSS
		err := o.Decode(b)
		return decoded(o, err)
	case SubtypeAddAddr:
		var o AddAddr
		err := o.Decode(b)
		return decoded(o, err)
	case SubtypeRemoveAddr:
		var o RemoveAddr
		if err := o.Decode(b); err != nil {
			return nil, err
		}
		o.AddrIDs = slices.Clone(o.AddrIDs)
		return o, nil
	case SubtypeMPPrio:
		var o MPPrio
		err := o.Decode(b)
		return decoded(o, err)
	case SubtypeMPFail:
		var o MPFail
		err := o.Decode(b)
		return decoded(o, err)
	case SubtypeMPFastclose:
		var o MPFastclose
		err := o.Decode(b)
		return decoded(o, err)
	case SubtypeMPTCPRst:
		var o MPTCPRst
		err := o.Decode(b)
		return decoded(o, err)
	default:
		if _, err := optionBytes(b, st); err != nil {
			return nil, err
		}
		return nil, fmt.Errorf("subtype %d: %w", uint8(st), ErrUnknownSubtype)
	}
}

func decoded[T Option](o T, err error) (Option, error) {
	if err != nil {
		return nil, err
	}
	return o, nil
}

// WalkTCPOptions iterates over a TCP options block, calling fn with the
// kind and raw bytes (kind and length included) of every option except EOL
// and NOP. The walk stops at EOL. A length byte below 2 or past the end of
// the block returns ErrMalformedOptions; an error from fn stops the walk
// and is returned unchanged.
func WalkTCPOptions(opts []byte, fn func(kind uint8, raw []byte) error) error {
	for i := 0; i < len(opts); {
		kind := opts[i]
		switch kind {
		case TCPOptionEOL:
			return nil
		case TCPOptionNOP:
			i++
			continue
		}
		if i+1 >= len(opts) {
			return fmt.Errorf("option kind %d at offset %d has no length: %w", kind, i, ErrMalformedOptions)
		}
		l := int(opts[i+1])
		if l < 2 || i+l > len(opts) {
			return fmt.Errorf("option kind %d at offset %d: length %d of %d: %w", kind, i, l, len(opts)-i, ErrMalformedOptions)
		}
		if err := fn(kind, opts[i:i+l]); err != nil {
			return err
		}
		i += l
	}
	return nil
}

// ParseMPTCP returns all MPTCP options of a TCP options block. A malformed
// MPTCP option does not hide the others: they are returned together with
// the joined errors of the bad ones (and of a malformed block layout).
func ParseMPTCP(opts []byte) ([]Option, error) {
	var out []Option
	var errs []error
	werr := WalkTCPOptions(opts, func(kind uint8, raw []byte) error {
		if kind != TCPOptionMPTCP {
			return nil
		}
		o, err := Parse(raw)
		if err != nil {
			errs = append(errs, err)
			return nil
		}
		out = append(out, o)
		return nil
	})
	if werr != nil {
		errs = append(errs, werr)
	}
	return out, errors.Join(errs...)
}

package header

import "encoding/binary"

// DSSChecksum computes the DSS checksum of RFC 8684 3.3.1: the ones'
// complement of the ones' complement sum of a pseudo-header (64-bit DSN,
// 32-bit relative subflow sequence number, 16-bit data-level length, 16-bit
// zero checksum field) and the payload. payloadSum is the ones' complement
// sum of the payload, folded or not, as gVisor's checksum.Checksum(payload,
// 0) returns it. The DSN is always the full 64-bit value, even when the
// option carries only its low 32 bits.
func DSSChecksum(dsn uint64, ssn uint32, dataLen uint16, payloadSum uint16) uint16 {
	var ph [16]byte
	binary.BigEndian.PutUint64(ph[0:], dsn)
	binary.BigEndian.PutUint32(ph[8:], ssn)
	binary.BigEndian.PutUint16(ph[12:], dataLen)
	// ph[14:16] is the zero checksum field.
	s := uint32(payloadSum)
	for i := 0; i < len(ph); i += 2 {
		s += uint32(binary.BigEndian.Uint16(ph[i:]))
	}
	for s > 0xffff {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}

// MPCapableChecksum is the checksum of a data-carrying MP_CAPABLE ACK
// (RFC 8684 3.1): the data is the first of the connection, so it is mapped
// at DSN = IDSN+1 (64 bits) and relative subflow sequence number 1.
// senderIDSN is the IDSN derived from the sender's key.
func MPCapableChecksum(senderIDSN uint64, dataLen uint16, payloadSum uint16) uint16 {
	return DSSChecksum(senderIDSN+1, 1, dataLen, payloadSum)
}

// Package kernelvectors is the layout of mptcpep/mpkey/testdata/kernel-vectors.json:
// values seen on the wire between two Linux kernel MPTCP endpoints. The
// integration tests write it (TestKernelCaptureKnownValues with
// MTC_WRITE_KERNEL_VECTORS=<path>); mptcpep's crypto tests check the
// engine's derivations against it. One definition, so the writer and the
// reader cannot drift apart.
package kernelvectors

import (
	"encoding/json"
	"fmt"
	"os"
)

// Vectors are one kernel's captured values.
type Vectors struct {
	Kernel      string `json:"kernel"`
	ClientKey   uint64 `json:"client_key"`
	ServerKey   uint64 `json:"server_key"`
	ServerToken uint32 `json:"server_token"` // from the MP_JOIN SYN
	// ClientFirstDSN and ServerFirstDSN are the DSN of the first data byte
	// of each direction (IDSN+1).
	ClientFirstDSN uint64 `json:"client_first_dsn"`
	ServerFirstDSN uint64 `json:"server_first_dsn"`
	Join           struct {
		ClientNonce uint32 `json:"client_nonce"`
		ServerNonce uint32 `json:"server_nonce"`
		SYNACKHMAC  uint64 `json:"synack_hmac"`
		ACKHMAC     string `json:"ack_hmac"` // hex, 20 bytes
	} `json:"join"`
	AddAddr struct {
		ID   uint8  `json:"id"`
		Addr string `json:"addr"`
		Port uint16 `json:"port"`
		HMAC uint64 `json:"hmac"` // sent by the server
	} `json:"add_addr"`
	DSSChecksum struct {
		DSN      uint64 `json:"dsn"`
		SSN      uint32 `json:"ssn"`
		DataLen  uint16 `json:"data_len"`
		Payload  string `json:"payload_hex"`
		Checksum uint16 `json:"checksum"`
	} `json:"dss_checksum"`
	MPCapableChecksum struct {
		ClientKey uint64 `json:"client_key"` // another connection
		DataLen   uint16 `json:"data_len"`
		Payload   string `json:"payload_hex"`
		Checksum  uint16 `json:"checksum"`
	} `json:"mpcapable_checksum"`
}

// Load reads a vector file.
func Load(path string) (Vectors, error) {
	var v Vectors
	b, err := os.ReadFile(path)
	if err != nil {
		return v, fmt.Errorf("kernel vectors: %w", err)
	}
	if err := json.Unmarshal(b, &v); err != nil {
		return v, fmt.Errorf("kernel vectors %s: %w", path, err)
	}
	return v, nil
}

// Save writes v to path, indented as the committed file is.
func Save(path string, v Vectors) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("kernel vectors: %w", err)
	}
	if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("kernel vectors: %w", err)
	}
	return nil
}

package main

import (
	"flag"
	"fmt"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
)

// fileConfig is the TOML config file: one section per daemon, mirroring
// the command-line flags (a flag given on the command line wins).
type fileConfig struct {
	Client clientFileConfig `toml:"client"`
	Server serverFileConfig `toml:"server"`
}

// clientFileConfig mirrors `mptun client` flags.
type clientFileConfig struct {
	Server       string   `toml:"server"`
	KeyFile      string   `toml:"key_file"`
	Uplinks      []string `toml:"uplinks"` // IFACE[,via=GATEWAY][,backup]
	Routes       []string `toml:"routes"`
	DefaultRoute bool     `toml:"default_route"`
	TUN          string   `toml:"tun"`
	QUIC         string   `toml:"quic"`
	Metrics      string   `toml:"metrics"`
	LogLevel     string   `toml:"log_level"`
	UnboundAuth  bool     `toml:"unbound_auth"`
	CC           string   `toml:"cc"`
}

// serverFileConfig mirrors `mptun server` flags.
type serverFileConfig struct {
	Listen            string   `toml:"listen"`
	KeyFile           string   `toml:"key_file"`
	Kernel            bool     `toml:"kernel"`
	Uplinks           []string `toml:"uplinks"`
	DenyJoinInitial   bool     `toml:"deny_join_initial"`
	Metrics           string   `toml:"metrics"`
	AllowPrivate      bool     `toml:"allow_private"`
	AllowFallback     bool     `toml:"allow_fallback"`
	MaxConnsPerClient int      `toml:"max_conns_per_client"`
	TCPIdle           duration `toml:"tcp_idle"`
	UDPIdle           duration `toml:"udp_idle"`
	LogLevel          string   `toml:"log_level"`
	CC                string   `toml:"cc"`
}

// duration is a time.Duration written as "90s", "2h".
type duration struct{ time.Duration }

func (d *duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("duration %q: %w", b, err)
	}
	d.Duration = v
	return nil
}

func (d duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// loadConfig reads a config file; unknown keys are errors, so a typo does
// not silently fall back to a default.
func loadConfig(path string) (*fileConfig, error) {
	var c fileConfig
	md, err := toml.DecodeFile(path, &c)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	if un := md.Undecoded(); len(un) > 0 {
		keys := make([]string, len(un))
		for i, k := range un {
			keys[i] = k.String()
		}
		return nil, fmt.Errorf("config %s: unknown keys: %s", path, strings.Join(keys, ", "))
	}
	return &c, nil
}

// setFlags returns the names of the flags given on the command line.
func setFlags(fs *flag.FlagSet) map[string]bool {
	m := make(map[string]bool)
	fs.Visit(func(f *flag.Flag) { m[f.Name] = true })
	return m
}

// applyConfig sets every flag not given on the command line from the
// config values (name -> value as flag text; lists set repeatedly).
func applyConfig(fs *flag.FlagSet, values map[string][]string) error {
	given := setFlags(fs)
	for name, vs := range values {
		if given[name] {
			continue
		}
		for _, v := range vs {
			if err := fs.Set(name, v); err != nil {
				return usageError{fmt.Errorf("config: %s = %q: %w", name, v, err)}
			}
		}
	}
	return nil
}

// flagValues turns a server section into flag texts (zero values skipped).
func (c *serverFileConfig) flagValues() map[string][]string {
	m := make(map[string][]string)
	str := func(name, v string) {
		if v != "" {
			m[name] = []string{v}
		}
	}
	boolean := func(name string, v bool) {
		if v {
			m[name] = []string{"true"}
		}
	}
	str("listen", c.Listen)
	str("key-file", c.KeyFile)
	str("cc", c.CC)
	boolean("kernel", c.Kernel)
	if len(c.Uplinks) > 0 {
		m["uplink"] = c.Uplinks
	}
	boolean("deny-join-initial", c.DenyJoinInitial)
	str("metrics", c.Metrics)
	boolean("allow-private", c.AllowPrivate)
	boolean("allow-fallback", c.AllowFallback)
	if c.MaxConnsPerClient != 0 {
		m["max-conns-per-client"] = []string{fmt.Sprint(c.MaxConnsPerClient)}
	}
	if c.TCPIdle.Duration != 0 {
		m["tcp-idle"] = []string{c.TCPIdle.String()}
	}
	if c.UDPIdle.Duration != 0 {
		m["udp-idle"] = []string{c.UDPIdle.String()}
	}
	str("log-level", c.LogLevel)
	return m
}

// flagValues turns a client section into flag texts (zero values skipped),
// for `mptun client --config`.
func (c *clientFileConfig) flagValues() map[string][]string {
	m := make(map[string][]string)
	str := func(name, v string) {
		if v != "" {
			m[name] = []string{v}
		}
	}
	str("server", c.Server)
	str("key-file", c.KeyFile)
	str("cc", c.CC)
	if len(c.Uplinks) > 0 {
		m["uplink"] = c.Uplinks
	}
	if len(c.Routes) > 0 {
		m["route"] = c.Routes
	}
	if c.DefaultRoute {
		m["default-route"] = []string{"true"}
	}
	str("tun", c.TUN)
	str("quic", c.QUIC)
	str("metrics", c.Metrics)
	str("log-level", c.LogLevel)
	if c.UnboundAuth {
		m["unbound-auth"] = []string{"true"}
	}
	return m
}

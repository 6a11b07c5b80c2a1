package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"time"

	"github.com/mptun/mptun/engine"
	"github.com/mptun/mptun/hostnet"
	"github.com/mptun/mptun/netstack/cc"
)

// uplinkFlags collects repeated --uplink values.
type uplinkFlags []hostnet.UplinkSpec

func (u *uplinkFlags) String() string {
	var s []string
	for _, x := range *u {
		s = append(s, x.String())
	}
	return strings.Join(s, " ")
}

func (u *uplinkFlags) Set(v string) error {
	spec, err := hostnet.ParseUplinkSpec(v)
	if err != nil {
		return err
	}
	*u = append(*u, spec)
	return nil
}

// commonFlags are the flags of every command that runs an engine
// (connect, listen, client, server).
type commonFlags struct {
	uplinks  uplinkFlags
	checksum bool
	logLevel string
	stats    bool
	every    time.Duration
	mtu      int
	cc       string
}

func (c *commonFlags) register(fs *flag.FlagSet) {
	fs.Var(&c.uplinks, "uplink", "uplink `IFACE[,via=GATEWAY][,backup]` (repeatable)")
	fs.BoolVar(&c.checksum, "checksum", false, "request DSS checksums")
	fs.StringVar(&c.logLevel, "log-level", "warn", "log level")
	fs.BoolVar(&c.stats, "stats", false, "print statistics at the end")
	fs.DurationVar(&c.every, "stats-every", 0, "print per-subflow rates, RTT and cwnd to stderr this often (0: never)")
	fs.IntVar(&c.mtu, "mtu", 0, "TUN MTU (0: the uplink's)")
	fs.StringVar(&c.cc, "cc", ccDefault(fs.Name()), "subflow congestion control: "+strings.Join(cc.Names(), ", "))
}

// ccDefault is the command's default congestion control, by bench figures
// (bench/results, 2026-12-06):
//   - connect, listen: bbr. Against kernel peers it matched or beat cubic
//     in every scenario but the satellite upload (12.3 vs 16.9 Mbit/s):
//     two equal paths 0.97 of the kernel, wifi-lte 0.93/0.92 (cubic
//     0.88/0.80), lossy upload 0.97 (cubic 0.10).
//   - client, server (the tunnel): cubic for now. Tunnel bbr wins lossy
//     links (78/77 vs 17/22 Mbit/s) but loses heterogeneous ones (wifi-lte
//     download 27 vs 46, three-unequal 52/61 vs 61/67, thousands of
//     retransmissions); users with lossy uplinks set --cc bbr.
func ccDefault(cmd string) string {
	switch cmd {
	case "client", "server":
		return cc.NameCubic
	default:
		return cc.NameBBR
	}
}

// cmdFlags is the preamble the engine commands share: a flag set with the
// common flags, then (parse) the command line, the count of positional
// arguments, the --config file section if the command takes one, and the
// logger at the level they ask for.
type cmdFlags struct {
	commonFlags
	fs *flag.FlagSet
	// section picks the command's part of a --config file (nil: no --config).
	section    func(*fileConfig) map[string][]string
	configPath *string
	// denyJoinInitial is --deny-join-initial (listen mode commands).
	denyJoinInitial bool
	// log is set by parse.
	log *slog.Logger
}

// newCmdFlags starts the flags of command name; the caller adds its own
// to fs before parse.
func newCmdFlags(name string) *cmdFlags {
	c := &cmdFlags{fs: flag.NewFlagSet(name, flag.ContinueOnError)}
	c.register(c.fs)
	return c
}

// withConfig adds --config FILE: section's values fill every flag the
// command line leaves unset.
func (c *cmdFlags) withConfig(section func(*fileConfig) map[string][]string) {
	c.section = section
	c.configPath = c.fs.String("config", "", fmt.Sprintf("TOML config `FILE` ([%s] section); flags override it", c.fs.Name()))
}

// withDenyJoinInitial adds --deny-join-initial, for the commands that
// accept connections on the engine.
func (c *cmdFlags) withDenyJoinInitial() {
	c.fs.BoolVar(&c.denyJoinInitial, "deny-join-initial", false,
		"refuse MP_JOINs to the address a connection began on and tell clients so (MP_CAPABLE C flag), as Linux's net.mptcp.allow_join_initial_addr_port=0: for a server behind a load balancer that would not steer joins to it")
}

// parse parses args, wants exactly nargs positional arguments (what names
// one in the error), applies the config file and makes the logger (after
// the file, which may set the level). Log lines go to stderr.
func (c *cmdFlags) parse(args []string, nargs int, what string, stderr io.Writer) error {
	if err := parseFlags(c.fs, args, stderr); err != nil {
		return err
	}
	switch {
	case nargs == 0 && c.fs.NArg() != 0:
		return usageError{fmt.Errorf("unexpected arguments %q", c.fs.Args())}
	case c.fs.NArg() != nargs:
		return usageError{fmt.Errorf("want exactly one %s, got %d arguments", what, c.fs.NArg())}
	}
	if c.section != nil && *c.configPath != "" {
		fc, err := loadConfig(*c.configPath)
		if err != nil {
			return err
		}
		if err := applyConfig(c.fs, c.section(fc)); err != nil {
			return err
		}
	}
	log, err := newLogger(c.logLevel, stderr)
	if err != nil {
		return err
	}
	c.log = log
	return nil
}

// parseFlags parses args into fs without letting the flag package print:
// run prints every error once, with the command's prefix (and the flags
// after a flag error). -h prints the flags and returns flag.ErrHelp.
func parseFlags(fs *flag.FlagSet, args []string, stderr io.Writer) error {
	fs.SetOutput(io.Discard)
	err := fs.Parse(args)
	fs.SetOutput(stderr)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, flag.ErrHelp):
		printFlags(stderr, fs)
		return err
	}
	return &flagsError{fs: fs, err: err}
}

// flagsError is a command line its flag set refused.
type flagsError struct {
	fs  *flag.FlagSet
	err error
}

func (e *flagsError) Error() string { return e.err.Error() }
func (e *flagsError) Unwrap() error { return e.err }

// printFlags lists a command's flags.
func printFlags(w io.Writer, fs *flag.FlagSet) {
	fmt.Fprintf(w, "flags of mptun %s:\n", fs.Name())
	fs.SetOutput(w)
	fs.PrintDefaults()
}

// startEngine starts the engine on the command's uplinks; a Config the
// engine refuses is the user's mistake, a usage error.
func (c *cmdFlags) startEngine(ctx context.Context, mode hostnet.Mode, port uint16) (*engine.Engine, error) {
	eng, err := engine.Start(ctx, engine.Config{Mode: mode, Uplinks: c.uplinks, ListenPort: port, MTU: c.mtu, Checksum: c.checksum,
		DenyJoinInitialAddr: c.denyJoinInitial, CongestionControl: c.cc, Logger: c.log})
	var ce *engine.ConfigError
	if errors.As(err, &ce) {
		return nil, usageError{err}
	}
	return eng, err
}

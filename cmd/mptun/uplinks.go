package main

import (
	"context"
	"errors"
	"flag"
	"log/slog"
	"strings"
	"time"

	"github.com/mptun/mptun/engine"
	"github.com/mptun/mptun/hostnet"
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

// commonFlags are shared by connect and listen.
type commonFlags struct {
	uplinks  uplinkFlags
	checksum bool
	logLevel string
	stats    bool
	every    time.Duration
	mtu      int
}

func (c *commonFlags) register(fs *flag.FlagSet) {
	fs.Var(&c.uplinks, "uplink", "uplink `IFACE[,via=GATEWAY][,backup]` (repeatable)")
	fs.BoolVar(&c.checksum, "checksum", false, "request DSS checksums")
	fs.StringVar(&c.logLevel, "log-level", "warn", "log level")
	fs.BoolVar(&c.stats, "stats", false, "print statistics at the end")
	fs.DurationVar(&c.every, "stats-every", 0, "print per-subflow rates, RTT and cwnd to stderr this often (0: never)")
	fs.IntVar(&c.mtu, "mtu", 0, "TUN MTU (0: the uplink's)")
}

// startEngine starts the engine on the command's uplinks; a Config the
// engine refuses is the user's mistake, a usage error.
func startEngine(ctx context.Context, mode hostnet.Mode, cf *commonFlags, port uint16, log *slog.Logger) (*engine.Engine, error) {
	eng, err := engine.Start(ctx, engine.Config{Mode: mode, Uplinks: cf.uplinks, ListenPort: port, MTU: cf.mtu, Checksum: cf.checksum, Logger: log})
	var ce *engine.ConfigError
	if errors.As(err, &ce) {
		return nil, usageError{err}
	}
	return eng, err
}

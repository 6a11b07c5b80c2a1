//go:build race

package cc_test

// raceEnabled: under the race detector the in-process stacks run 5-10x
// slower than the links they emulate (BBR at 1 % loss: 8 RTOs, 6 Mbit/s), so
// throughput is not asserted; the race detector still runs the code.
const raceEnabled = true

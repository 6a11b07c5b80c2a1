//go:build race

package linkpipe

// raceEnabled: under the race detector gVisor's TCP (and the raw sender) is
// too slow to saturate fast links, so rate tests only check the upper bound.
const raceEnabled = true

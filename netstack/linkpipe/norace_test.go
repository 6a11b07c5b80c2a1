//go:build !race

package linkpipe

const raceEnabled = false

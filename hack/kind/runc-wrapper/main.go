// runc-kubefly: a runc wrapper for hosts whose capability bounding set lacks
// CAP_SYS_RESOURCE (some microVM sandboxes). There, runc fails to start
// privileged containers ("unable to apply caps") and pod sandboxes (the CRI
// asks for a negative oom_score_adj, which needs the capability).
//
// On `create`/`run` it removes CAP_SYS_RESOURCE from every capability set of
// the bundle's config.json and raises a negative process.oomScoreAdj to 0; on
// `exec` it does the same to the --process file. Then it execs the real runc
// with the arguments unchanged. Where the capability is in its own bounding
// set, it touches nothing. Standard library only, static: it also runs inside
// kind node images that have no JSON tooling.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

const capSysResource = 24 // linux/capability.h

// realRunc is the runc this wrapper delegates to; Debian installs it here.
func realRunc() string {
	if p := os.Getenv("KUBEFLY_REAL_RUNC"); p != "" {
		return p
	}
	return "/usr/sbin/runc"
}

// boundingHasSysResource reads CapBnd from a /proc status file.
func boundingHasSysResource(statusPath string) (bool, error) {
	f, err := os.Open(statusPath)
	if err != nil {
		return false, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "CapBnd:"); ok {
			mask, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err != nil {
				return false, err
			}
			return mask&(1<<capSysResource) != 0, nil
		}
	}
	return false, fmt.Errorf("no CapBnd line in %s", statusPath)
}

// fixProcess edits an OCI process object in place; it reports whether it changed anything.
func fixProcess(proc map[string]any) bool {
	changed := false
	if caps, ok := proc["capabilities"].(map[string]any); ok {
		for set, v := range caps {
			list, ok := v.([]any)
			if !ok {
				continue
			}
			kept := list[:0:0]
			for _, c := range list {
				if c != "CAP_SYS_RESOURCE" {
					kept = append(kept, c)
				}
			}
			if len(kept) != len(list) {
				caps[set] = kept
				changed = true
			}
		}
	}
	if n, ok := proc["oomScoreAdj"].(json.Number); ok {
		if v, err := n.Int64(); err == nil && v < 0 {
			proc["oomScoreAdj"] = json.Number("0")
			changed = true
		}
	}
	return changed
}

// rewrite applies fix to the JSON file at path; the file is rewritten only if
// something changed (numbers keep their exact text).
func rewrite(path string, fix func(map[string]any) bool) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	var doc map[string]any
	if err := dec.Decode(&doc); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if !fix(doc) {
		return nil
	}
	out, err := json.Marshal(doc)
	if err != nil {
		return err
	}
	info, err := os.Stat(path)
	if err != nil {
		return err
	}
	return os.WriteFile(path, out, info.Mode().Perm())
}

// globalFlagsWithValue are runc's global options that take a separate value.
var globalFlagsWithValue = map[string]bool{
	"--root": true, "--log": true, "--log-format": true, "--criu": true, "--rootless": true,
}

// command finds runc's subcommand and the arguments after it.
func command(args []string) (string, []string) {
	for i := 0; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, "-") {
			return a, args[i+1:]
		}
		if globalFlagsWithValue[a] {
			i++
		}
	}
	return "", nil
}

// flagValue returns the value of --name/-short in either "--name v" or "--name=v" form.
func flagValue(args []string, names ...string) string {
	for i, a := range args {
		for _, n := range names {
			if a == n && i+1 < len(args) {
				return args[i+1]
			}
			if v, ok := strings.CutPrefix(a, n+"="); ok {
				return v
			}
		}
	}
	return ""
}

func adjust(args []string) error {
	cmd, rest := command(args)
	switch cmd {
	case "create", "run":
		bundle := flagValue(rest, "--bundle", "-b")
		if bundle == "" {
			bundle = "."
		}
		return rewrite(filepath.Join(bundle, "config.json"), func(doc map[string]any) bool {
			proc, ok := doc["process"].(map[string]any)
			return ok && fixProcess(proc)
		})
	case "exec":
		if p := flagValue(rest, "--process", "-p"); p != "" {
			return rewrite(p, fixProcess)
		}
	}
	return nil
}

func main() {
	status := os.Getenv("KUBEFLY_PROC_STATUS") // tests point this at a fixture
	if status == "" {
		status = "/proc/self/status"
	}
	has, err := boundingHasSysResource(status)
	if err != nil {
		fmt.Fprintln(os.Stderr, "runc-kubefly:", err)
		os.Exit(1)
	}
	if !has {
		if err := adjust(os.Args[1:]); err != nil {
			fmt.Fprintln(os.Stderr, "runc-kubefly:", err)
			os.Exit(1)
		}
	}
	runc := realRunc()
	err = syscall.Exec(runc, append([]string{runc}, os.Args[1:]...), os.Environ())
	fmt.Fprintln(os.Stderr, "runc-kubefly: exec", runc+":", err)
	os.Exit(1)
}

//go:build tools

// Package tools pins the CloudNativePG operator that the real-cluster tests run: its manager
// (cmd/manager) is built from the Go module proxy at the version in go.mod, and its release
// manifest (releases/cnpg-<version>.yaml) is read from the same module (see the Makefile).
package tools

import (
	_ "github.com/cloudnative-pg/cloudnative-pg/cmd/manager"
)

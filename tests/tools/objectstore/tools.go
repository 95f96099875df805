//go:build tools

// The S3-compatible object store CloudNativePG archives WAL to in the tests: versitygw's
// gateway over a plain directory (built with go build github.com/versity/versitygw/cmd/versitygw).
package tools

import _ "github.com/versity/versitygw/cmd/versitygw"

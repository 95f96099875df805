//go:build tools

// Helm 4 (the chart's tests and the test cluster's installs), Helm 3 (the chart is linted and
// rendered with it too) and helm-docs (the chart's README), built into the tool cache.
package tools

import (
	_ "github.com/norwoodj/helm-docs/cmd/helm-docs"
	_ "helm.sh/helm/v3/cmd/helm"
	_ "helm.sh/helm/v4/cmd/helm"
)

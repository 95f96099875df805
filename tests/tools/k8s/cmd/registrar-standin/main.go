// Command registrar-standin is a TEST STAND-IN for node-driver-registrar, whose module the Go
// module proxy does not serve. It takes the real sidecar's flags and does its job the same way:
// it asks the CSI node plugin for its name, serves kubelet's plugin-registration API
// (k8s.io/kubelet/pkg/apis/pluginregistration/v1) on <plugin-registration-path>/<driver>-reg.sock,
// and exits when kubelet reports that registration failed, so the pod restarts and retries.
// It is built and used only by the test cluster; deploy/ names the real image.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	csi "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

type registrar struct {
	registerapi.UnimplementedRegistrationServer
	driver   string
	endpoint string
}

func (r *registrar) GetInfo(ctx context.Context, req *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	log.Printf("kubelet asked for plugin info: %s at %s", r.driver, r.endpoint)
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              r.driver,
		Endpoint:          r.endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (r *registrar) NotifyRegistrationStatus(ctx context.Context, status *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if !status.PluginRegistered {
		log.Printf("kubelet refused the registration of %s: %s; exiting so the container restarts", r.driver, status.Error)
		os.Exit(1)
	}
	log.Printf("kubelet registered %s", r.driver)
	return &registerapi.RegistrationStatusResponse{}, nil
}

func driverName(address string, timeout time.Duration) (string, error) {
	target := address
	if !strings.HasPrefix(target, "unix://") {
		target = "unix://" + target
	}
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return "", err
	}
	defer conn.Close()
	deadline := time.Now().Add(timeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		info, err := csi.NewIdentityClient(conn).GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
		cancel()
		if err == nil {
			return info.GetName(), nil
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("GetPluginInfo on %s: %w", address, err)
		}
		log.Printf("waiting for the CSI driver at %s: %v", address, err)
		time.Sleep(time.Second)
	}
}

func main() {
	csiAddress := flag.String("csi-address", "/run/csi/socket", "the CSI driver's socket in this container")
	kubeletPath := flag.String("kubelet-registration-path", "", "the CSI driver's socket as kubelet sees it on the host")
	registrationDir := flag.String("plugin-registration-path", "/registration", "kubelet's plugins_registry directory in this container")
	httpEndpoint := flag.String("http-endpoint", "", "serve /healthz here (host:port); empty: no health endpoint")
	timeout := flag.Duration("timeout", time.Second, "timeout of each call to the CSI driver")
	flag.Int("v", 0, "accepted for compatibility; logging has one level")
	flag.Parse()
	if *kubeletPath == "" {
		log.Fatal("--kubelet-registration-path is required")
	}

	name, err := driverName(*csiAddress, *timeout+60*time.Second)
	if err != nil {
		log.Fatal(err)
	}
	socket := filepath.Join(*registrationDir, name+"-reg.sock")
	if err := os.Remove(socket); err != nil && !os.IsNotExist(err) {
		log.Fatalf("removing the old registration socket %s: %v", socket, err)
	}
	listener, err := net.Listen("unix", socket)
	if err != nil {
		log.Fatalf("listening on %s: %v", socket, err)
	}
	server := grpc.NewServer()
	registerapi.RegisterRegistrationServer(server, &registrar{driver: name, endpoint: *kubeletPath})

	if *httpEndpoint != "" {
		mux := http.NewServeMux()
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
			if _, err := os.Stat(socket); err != nil {
				http.Error(w, err.Error(), http.StatusInternalServerError)
				return
			}
			fmt.Fprintln(w, "ok")
		})
		go func() { log.Fatal(http.ListenAndServe(*httpEndpoint, mux)) }()
	}

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-stop
		server.Stop()
		_ = os.Remove(socket)
		os.Exit(0)
	}()
	log.Printf("serving plugin registration for %s on %s", name, socket)
	if err := server.Serve(listener); err != nil {
		log.Fatal(err)
	}
}

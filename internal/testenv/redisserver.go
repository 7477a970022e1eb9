package testenv

import (
	"fmt"
	"net"
	"os/exec"
	"sync"
	"testing"
	"time"
)

// RedisServer is a redis-server of a test's own on a free loopback port,
// without persistence, for tests that kill and restart Redis. It is killed
// when the test ends.
type RedisServer struct {
	t    testing.TB
	port int
	args []string // extra redis-server arguments

	mu  sync.Mutex
	cmd *exec.Cmd
}

// NewRedisServer starts a redis-server (from PATH). It fails the test if
// there is none.
func NewRedisServer(t testing.TB) *RedisServer {
	t.Helper()
	return NewRedisServerWith(t)
}

// NewRedisServerWith is NewRedisServer with extra redis-server arguments,
// such as "--requirepass", "pw" or a TLS setup. With "--tls-port", "PORT"
// the server's one port (Addr) speaks TLS: PORT is replaced by it, and the
// plaintext port is off.
func NewRedisServerWith(t testing.TB, args ...string) *RedisServer {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Fatalf("testenv: redis-server is required on PATH: %v", err)
	}
	r := &RedisServer{t: t, port: freePort(t), args: args}
	r.Start()
	t.Cleanup(r.Kill)
	return r
}

// Addr is the server's host:port; it stays the same across restarts.
func (r *RedisServer) Addr() string { return fmt.Sprintf("127.0.0.1:%d", r.port) }

// Start starts the server (empty, since nothing persists) and waits until
// it accepts connections.
func (r *RedisServer) Start() {
	r.t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cmd != nil {
		return
	}
	port := fmt.Sprint(r.port)
	args := []string{"--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no"}
	for i, a := range r.args {
		if a == "PORT" && i > 0 && r.args[i-1] == "--tls-port" {
			args[1], a = "0", port
		}
		args = append(args, a)
	}
	cmd := exec.Command("redis-server", args...)
	if err := cmd.Start(); err != nil {
		r.t.Fatalf("testenv: start redis-server: %v", err)
	}
	r.cmd = cmd
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", r.Addr(), time.Second)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			r.t.Fatalf("testenv: redis-server on %s did not start: %v", r.Addr(), err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Kill kills the server like a crash (SIGKILL) and waits for it to exit.
func (r *RedisServer) Kill() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cmd == nil {
		return
	}
	r.cmd.Process.Kill()
	r.cmd.Wait()
	r.cmd = nil
}

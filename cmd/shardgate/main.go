// Command shardgate is the Shardgate server.
//
//	shardgate serve --catalog DSN --jwt-keys FILE --jwt-issuer ISS --jwt-audience AUD
//	                                     serve a cluster whose catalog is at DSN
//	shardgate init --catalog DSN --shard NAME=DSN ...   create a cluster
//	shardgate dev                        a whole local cluster on this machine
//
// Every flag can also be set with a SHARDGATE_* environment variable.
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/alecthomas/kong"
)

type cli struct {
	LogLevel  slog.Level `help:"Log level: debug, info, warn or error." default:"info" env:"SHARDGATE_LOG_LEVEL"`
	LogFormat string     `help:"Log format: text or json." enum:"text,json" default:"text" env:"SHARDGATE_LOG_FORMAT"`

	Serve serveCmd `cmd:"" help:"Serve the gRPC API for an existing cluster."`
	Init  initCmd  `cmd:"" help:"Create a cluster: migrate the catalog and shards and place the partitions."`
	Dev   devCmd   `cmd:"" help:"Run a local cluster on this machine's PostgreSQL and Redis (loopback only, no TLS; tokens optional)."`
}

func main() {
	var c cli
	kctx := kong.Parse(&c,
		kong.Name("shardgate"),
		kong.Description("Shardgate: sharded per-user data on PostgreSQL, served over gRPC."),
		kong.UsageOnError(),
	)
	logger := newLogger(c.LogLevel, c.LogFormat)
	slog.SetDefault(logger)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// The first signal starts a graceful stop; restoring the default
	// handling lets a second one end the process at once.
	go func() { <-ctx.Done(); stop() }()
	kctx.BindTo(ctx, (*context.Context)(nil))
	if err := kctx.Run(logger); err != nil {
		fmt.Fprintln(os.Stderr, "shardgate:", err)
		os.Exit(1)
	}
}

func newLogger(level slog.Level, format string) *slog.Logger {
	opts := &slog.HandlerOptions{Level: level}
	if format == "json" {
		return slog.New(slog.NewJSONHandler(os.Stderr, opts))
	}
	return slog.New(slog.NewTextHandler(os.Stderr, opts))
}

package testenv

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

func TestPGClusterStopStart(t *testing.T) {
	t.Parallel()
	c := NewPGCluster(t)
	dsn := c.CreateDatabase("app")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	query := func() error {
		conn, err := pgx.Connect(ctx, dsn)
		if err != nil {
			return err
		}
		defer conn.Close(ctx)
		var level string
		if err := conn.QueryRow(ctx, `SHOW wal_level`).Scan(&level); err != nil {
			return err
		}
		if level != "logical" {
			t.Fatalf("wal_level = %s, want logical", level)
		}
		return nil
	}
	if err := query(); err != nil {
		t.Fatal(err)
	}
	c.Stop()
	if err := query(); err == nil {
		t.Fatal("a stopped cluster answered")
	}
	c.Start()
	if err := query(); err != nil {
		t.Fatalf("after restart: %v", err)
	}
}

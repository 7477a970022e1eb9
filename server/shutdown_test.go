package server

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

// On shutdown (SIGTERM cancels the serve context) an in-flight call still
// finishes and succeeds; calls after it are refused.
func TestGracefulShutdownFinishesInFlightCalls(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 1)
	ts := c.start(t, false)
	ctx := ctxT(t)
	if _, err := ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: "hank"}); err != nil {
		t.Fatal(err)
	}
	// Hold the user's row so the next write blocks inside the shard.
	locker := c.connect(t, c.names[0])
	defer locker.Close(context.Background())
	tx, err := locker.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, `SELECT 1 FROM users WHERE user_id = 'hank' FOR UPDATE`); err != nil {
		t.Fatal(err)
	}
	inFlight := make(chan error, 1)
	go func() {
		_, err := ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: "hank", ProfileJson: `{"last":"write"}`})
		inFlight <- err
	}()
	// Wait until the write is blocked on the lock.
	for deadline := time.Now().Add(10 * time.Second); c.count(t, c.names[0], `SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()`) == 0; {
		select {
		case err := <-inFlight:
			t.Fatalf("the write finished without waiting for the lock: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("the write never blocked on the lock")
		}
		time.Sleep(5 * time.Millisecond)
	}
	ts.stop() // what SIGTERM does in cmd/shardgate
	time.Sleep(50 * time.Millisecond)
	select {
	case err := <-inFlight:
		t.Fatalf("in-flight call ended before its work could finish: %v", err)
	default:
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-inFlight; err != nil {
		t.Fatalf("in-flight call failed during shutdown: %v", err)
	}
	if err := <-ts.done; err != nil {
		t.Fatalf("Serve: %v", err)
	}
	ts.done <- nil // for the cleanup
	_, err = ts.data.GetUser(ctx, &pb.GetUserRequest{UserId: "hank"})
	wantCode(t, err, codes.Unavailable)
}

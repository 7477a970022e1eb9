package server

import (
	"context"
	"errors"
	"slices"
	"sync"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/shardgate/shardgate/auth"
	"github.com/shardgate/shardgate/events"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
	"github.com/shardgate/shardgate/router"
)

// maxWatchUsers caps the users one Watch follows.
const maxWatchUsers = 1000

// resyncAdvice ends every OUT_OF_RANGE message of Watch.
const resyncAdvice = "; resync: reread the watched state (Get/List calls), then watch again without a cursor"

// maxWatchesPerUser caps the concurrent watches of one user principal on an
// instance, so a user token cannot take the slots (--max-watchers) that
// pushers need. Services and admins are trusted infrastructure: a gateway
// may hold a watch per connected client.
const maxWatchesPerUser = 8

// watchCounts counts open watches per user.
type watchCounts struct {
	mu sync.Mutex
	n  map[string]int
}

// acquire takes a slot for user, or reports false when it has them all.
func (w *watchCounts) acquire(user string) (release func(), ok bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.n[user] >= maxWatchesPerUser {
		return nil, false
	}
	if w.n == nil {
		w.n = map[string]int{}
	}
	w.n[user]++
	return func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		if w.n[user]--; w.n[user] == 0 {
			delete(w.n, user)
		}
	}, true
}

// errShuttingDown ends the watches of a server that is stopping.
var errShuttingDown = status.Error(codes.Unavailable, "server shutting down; resume from your last cursor on another instance")

// watchEnded is the status of a watch whose context ended: the cause when
// it is one (shutdown, token expiry), else the context's own error.
func watchEnded(ctx context.Context) error {
	if st, ok := status.FromError(context.Cause(ctx)); ok && st.Code() != codes.Unknown && st.Code() != codes.OK {
		return st.Err()
	}
	return status.FromContextError(ctx.Err()).Err()
}

// Watch streams the changes of users, partitions or config (see the proto).
func (d *DataService) Watch(req *pb.WatchRequest, stream pb.DataService_WatchServer) error {
	// Shutdown (EndWatches) ends the stream too, with its own cause.
	ctx, cancel := context.WithCancelCause(stream.Context())
	defer cancel(nil)
	defer context.AfterFunc(d.s.watchesCtx, func() { cancel(context.Cause(d.s.watchesCtx)) })()
	method := "/shardgate.v1.DataService/Watch"
	sub, err := d.watchSubscription(req)
	if err != nil {
		return toStatus(ctx, d.s.opts.Logger, method, err)
	}
	follower := d.s.follower.Load()
	switch {
	case d.s.watchesCtx.Err() != nil: // shutting down: no new watches
		return watchEnded(d.s.watchesCtx)
	case ctx.Err() != nil:
		return watchEnded(ctx)
	case follower == nil && d.s.opts.RunRelays:
		return status.Error(codes.Unavailable, "change events are not available yet on this server: its Redis is unreachable; retry")
	case follower == nil:
		return status.Error(codes.FailedPrecondition, "change events are off on this server (it runs without Redis)")
	}
	if n := d.s.watchers.Add(1); n > int64(d.s.opts.MaxWatchers) {
		d.s.watchers.Add(-1)
		return status.Errorf(codes.ResourceExhausted, "this server already serves %d watches; retry on another instance or later", d.s.opts.MaxWatchers)
	}
	defer d.s.watchers.Add(-1)
	if p, ok := auth.PrincipalFrom(ctx); ok && p.Role == auth.RoleUser {
		release, ok := d.s.userWatches.acquire(p.Subject)
		if !ok {
			return status.Errorf(codes.ResourceExhausted, "user %s already has %d open watches on this server; close one first", p.Subject, maxWatchesPerUser)
		}
		defer release()
	}
	emit := func(e *events.Event, cur events.Cursor) error {
		if err := stream.Send(&pb.WatchResponse{Kind: &pb.WatchResponse_Event{Event: changeEvent(e, cur)}}); err != nil {
			return err
		}
		d.s.observer.eventsSent.Add(1)
		return nil
	}
	heartbeat := func(cur events.Cursor) error {
		return stream.Send(&pb.WatchResponse{Kind: &pb.WatchResponse_Heartbeat{Heartbeat: &pb.Heartbeat{
			Cursor: cur.String(), Time: timestamppb.Now(),
		}}})
	}
	err = follower.Follow(ctx, sub, emit, heartbeat)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, events.ErrCursorExpired):
		return status.Error(codes.OutOfRange, "cursor: the events right after it are no longer retained"+resyncAdvice)
	case errors.Is(err, events.ErrFellBehind):
		return status.Error(codes.OutOfRange, "the watch fell behind the stream retention"+resyncAdvice)
	case ctx.Err() != nil:
		return watchEnded(ctx)
	}
	if _, ok := status.FromError(err); ok {
		return err // from Send
	}
	d.s.opts.Logger.Warn("watch failed", "err", err)
	return status.Error(codes.Unavailable, "event streams unavailable; retry with the last cursor")
}

// watchSubscription turns a checked WatchRequest into a subscription,
// touching nothing but the routing table. The rules check each field; this
// checks how they combine, and parses the cursor.
func (d *DataService) watchSubscription(req *pb.WatchRequest) (events.Subscription, error) {
	var sub events.Subscription
	users, parts := req.GetUserIds(), req.GetPartitions()
	switch {
	case len(users) > 0 && len(parts) > 0:
		return sub, invalid("partitions", "set user_ids or partitions, not both")
	case len(users) == 0 && len(parts) == 0 && !req.GetConfig():
		return sub, invalid("user_ids", "set user_ids, partitions or config")
	}
	n := d.s.partitionCount()
	if n == 0 {
		return sub, errNoTable
	}
	for _, id := range users {
		if sub.Users == nil {
			sub.Users = make(map[string]bool, len(users))
		}
		sub.Users[id] = true
		sub.Partitions = append(sub.Partitions, router.Partition(id, n))
	}
	for _, p := range parts {
		sub.Partitions = append(sub.Partitions, int32(p))
	}
	slices.Sort(sub.Partitions)
	sub.Partitions = slices.Compact(sub.Partitions)
	sub.Config = req.GetConfig()
	if c := req.GetCursor(); c != "" {
		cur, err := events.ParseCursor(c)
		if err != nil {
			return sub, invalid("cursor", "not a cursor from this API (pass one from a ChangeEvent or heartbeat, or none to start from now)")
		}
		sub.From = cur
	}
	return sub, nil
}

func changeEvent(e *events.Event, cur events.Cursor) *pb.ChangeEvent {
	ce := &pb.ChangeEvent{
		EventId:        e.ID,
		UserId:         e.UserID,
		Entity:         e.Entity,
		Key:            e.Key,
		Op:             e.Op,
		Version:        e.Version,
		PayloadJson:    string(e.Payload),
		CommittedAt:    timestamppb.New(e.CommittedAt),
		PayloadOmitted: e.Omitted,
	}
	if e.Partition >= 0 {
		ce.Partition = uint32(e.Partition)
	}
	if cur != nil {
		ce.Cursor = cur.String()
	}
	return ce
}

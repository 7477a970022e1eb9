package server

import (
	"encoding/json"
	"fmt"
	"reflect"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

func jsonEqual(t *testing.T, got, want string) {
	t.Helper()
	var g, w any
	if err := json.Unmarshal([]byte(got), &g); err != nil {
		t.Fatalf("got invalid JSON %q: %v", got, err)
	}
	if err := json.Unmarshal([]byte(want), &w); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(g, w) {
		t.Fatalf("JSON %s, want %s", got, want)
	}
}

func TestUserRoundTrip(t *testing.T) {
	t.Parallel()
	ts := newTestCluster(t, 2).start(t, false)
	ctx := ctxT(t)

	_, err := ts.data.GetUser(ctx, &pb.GetUserRequest{UserId: "alice"})
	wantCode(t, err, codes.NotFound)

	put, err := ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: "alice", ProfileJson: `{"name":"Alice"}`})
	if err != nil || put.Version != 1 {
		t.Fatalf("PutUser = %v, %v", put, err)
	}
	got, err := ts.data.GetUser(ctx, &pb.GetUserRequest{UserId: "alice"})
	if err != nil {
		t.Fatal(err)
	}
	jsonEqual(t, got.ProfileJson, `{"name":"Alice"}`)
	loc, err := ts.admin.LocateUser(ctx, &pb.LocateUserRequest{UserId: "alice"})
	if err != nil || got.Partition != loc.Partition || got.Version != 1 {
		t.Fatalf("GetUser = %v; LocateUser = %v, %v", got, loc, err)
	}

	// Optimistic concurrency: a stale expected version is Aborted and
	// changes nothing; the right one wins.
	_, err = ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: "alice", ProfileJson: `{"name":"Mallory"}`, ExpectedVersion: proto.Int64(0)})
	wantCode(t, err, codes.Aborted)
	_, err = ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: "alice", ProfileJson: `{"name":"Mallory"}`, ExpectedVersion: proto.Int64(7)})
	wantCode(t, err, codes.Aborted)
	put, err = ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: "alice", ProfileJson: `{"name":"Alice B"}`, ExpectedVersion: proto.Int64(1)})
	if err != nil || put.Version != 2 {
		t.Fatalf("PutUser with expected 1 = %v, %v", put, err)
	}
	got, _ = ts.data.GetUser(ctx, &pb.GetUserRequest{UserId: "alice"})
	jsonEqual(t, got.ProfileJson, `{"name":"Alice B"}`)

	// Deleting the user takes their sessions and items along.
	if _, err := ts.data.CreateSession(ctx, &pb.CreateSessionRequest{UserId: "alice", TtlSeconds: 60}); err != nil {
		t.Fatal(err)
	}
	if _, err := ts.data.PutItem(ctx, &pb.PutItemRequest{UserId: "alice", Collection: "c", Key: "k", ValueJson: "1"}); err != nil {
		t.Fatal(err)
	}
	_, err = ts.data.DeleteUser(ctx, &pb.DeleteUserRequest{UserId: "alice", ExpectedVersion: proto.Int64(1)})
	wantCode(t, err, codes.Aborted)
	del, err := ts.data.DeleteUser(ctx, &pb.DeleteUserRequest{UserId: "alice"})
	if err != nil || del.SessionsDeleted != 1 || del.ItemsDeleted != 1 {
		t.Fatalf("DeleteUser = %v, %v", del, err)
	}
	_, err = ts.data.GetUser(ctx, &pb.GetUserRequest{UserId: "alice"})
	wantCode(t, err, codes.NotFound)
	_, err = ts.data.DeleteUser(ctx, &pb.DeleteUserRequest{UserId: "alice"})
	wantCode(t, err, codes.NotFound)
}

func TestSessionLifecycle(t *testing.T) {
	t.Parallel()
	ts := newTestCluster(t, 2).start(t, false)
	ctx := ctxT(t)

	_, err := ts.data.CreateSession(ctx, &pb.CreateSessionRequest{UserId: "bob", TtlSeconds: 60})
	wantCode(t, err, codes.NotFound) // no such user
	if _, err := ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: "bob"}); err != nil {
		t.Fatal(err)
	}
	created, err := ts.data.CreateSession(ctx, &pb.CreateSessionRequest{UserId: "bob", DataJson: `{"ip":"10.0.0.1"}`, TtlSeconds: 60})
	if err != nil {
		t.Fatal(err)
	}
	loc, _ := ts.admin.LocateUser(ctx, &pb.LocateUserRequest{UserId: "bob"})
	if want := fmt.Sprintf("%d.", loc.Partition); created.Token[:len(want)] != want {
		t.Fatalf("token %q does not start with the partition %q", created.Token, want)
	}
	got, err := ts.data.GetSession(ctx, &pb.GetSessionRequest{Token: created.Token})
	if err != nil || got.UserId != "bob" || got.Version != 1 {
		t.Fatalf("GetSession = %v, %v", got, err)
	}
	jsonEqual(t, got.DataJson, `{"ip":"10.0.0.1"}`)

	touched, err := ts.data.TouchSession(ctx, &pb.TouchSessionRequest{Token: created.Token, TtlSeconds: 3600})
	if err != nil || !touched.ExpiresAt.AsTime().After(created.ExpiresAt.AsTime()) || touched.Version != 2 {
		t.Fatalf("TouchSession = %v, %v", touched, err)
	}
	list, err := ts.data.ListSessions(ctx, &pb.ListSessionsRequest{UserId: "bob"})
	if err != nil || len(list.Sessions) != 1 || len(list.Sessions[0].SessionId) != 64 {
		t.Fatalf("ListSessions = %v, %v", list, err)
	}
	if _, err := ts.data.RevokeSession(ctx, &pb.RevokeSessionRequest{Token: created.Token}); err != nil {
		t.Fatal(err)
	}
	_, err = ts.data.GetSession(ctx, &pb.GetSessionRequest{Token: created.Token})
	wantCode(t, err, codes.NotFound)
	_, err = ts.data.RevokeSession(ctx, &pb.RevokeSessionRequest{Token: created.Token})
	wantCode(t, err, codes.NotFound)

	// A well-formed token that was never issued.
	fake, _ := newToken(loc.Partition)
	_, err = ts.data.GetSession(ctx, &pb.GetSessionRequest{Token: fake})
	wantCode(t, err, codes.NotFound)
}

func TestItems(t *testing.T) {
	t.Parallel()
	ts := newTestCluster(t, 2).start(t, false)
	ctx := ctxT(t)
	_, err := ts.data.PutItem(ctx, &pb.PutItemRequest{UserId: "carol", Collection: "notes", Key: "n00", ValueJson: "0"})
	wantCode(t, err, codes.NotFound) // items belong to an existing user
	if _, err := ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: "carol"}); err != nil {
		t.Fatal(err)
	}
	for i := range 25 {
		_, err := ts.data.PutItem(ctx, &pb.PutItemRequest{UserId: "carol", Collection: "notes", Key: fmt.Sprintf("n%02d", i), ValueJson: fmt.Sprint(i)})
		if err != nil {
			t.Fatal(err)
		}
	}
	if _, err := ts.data.PutItem(ctx, &pb.PutItemRequest{UserId: "carol", Collection: "notes", Key: "other", ValueJson: `{"x":[1,2]}`}); err != nil {
		t.Fatal(err)
	}
	var keys []string
	token := ""
	for pages := 0; ; pages++ {
		resp, err := ts.data.ListItems(ctx, &pb.ListItemsRequest{UserId: "carol", Collection: "notes", Prefix: "n", PageSize: 10, PageToken: token})
		if err != nil {
			t.Fatal(err)
		}
		for _, it := range resp.Items {
			keys = append(keys, it.Key)
		}
		if token = resp.NextPageToken; token == "" {
			if pages != 2 {
				t.Fatalf("25 items in pages of 10 took %d pages", pages+1)
			}
			break
		}
	}
	if len(keys) != 25 || keys[0] != "n00" || keys[24] != "n24" {
		t.Fatalf("listed %v", keys)
	}

	it, err := ts.data.GetItem(ctx, &pb.GetItemRequest{UserId: "carol", Collection: "notes", Key: "other"})
	if err != nil {
		t.Fatal(err)
	}
	jsonEqual(t, it.Item.ValueJson, `{"x":[1,2]}`)
	_, err = ts.data.PutItem(ctx, &pb.PutItemRequest{UserId: "carol", Collection: "notes", Key: "other", ValueJson: "1", ExpectedVersion: proto.Int64(2)})
	wantCode(t, err, codes.Aborted)
	_, err = ts.data.DeleteItem(ctx, &pb.DeleteItemRequest{UserId: "carol", Collection: "notes", Key: "other", ExpectedVersion: proto.Int64(2)})
	wantCode(t, err, codes.Aborted)
	if _, err := ts.data.DeleteItem(ctx, &pb.DeleteItemRequest{UserId: "carol", Collection: "notes", Key: "other", ExpectedVersion: proto.Int64(1)}); err != nil {
		t.Fatal(err)
	}
	_, err = ts.data.GetItem(ctx, &pb.GetItemRequest{UserId: "carol", Collection: "notes", Key: "other"})
	wantCode(t, err, codes.NotFound)
	_, err = ts.data.DeleteItem(ctx, &pb.DeleteItemRequest{UserId: "carol", Collection: "notes", Key: "other"})
	wantCode(t, err, codes.NotFound)
}

func TestConfig(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 1)
	ts := c.start(t, false)
	ctx := ctxT(t)
	_, err := ts.data.GetConfig(ctx, &pb.GetConfigRequest{Namespace: "flags", Key: "beta"})
	wantCode(t, err, codes.NotFound)
	set, err := ts.data.SetConfig(ctx, &pb.SetConfigRequest{Namespace: "flags", Key: "beta", ValueJson: "true"})
	if err != nil || set.Version != 1 {
		t.Fatalf("SetConfig = %v, %v", set, err)
	}
	_, err = ts.data.SetConfig(ctx, &pb.SetConfigRequest{Namespace: "flags", Key: "beta", ValueJson: "false", ExpectedVersion: proto.Int64(0)})
	wantCode(t, err, codes.Aborted)
	set, err = ts.data.SetConfig(ctx, &pb.SetConfigRequest{Namespace: "flags", Key: "beta", ValueJson: "false", ExpectedVersion: proto.Int64(1)})
	if err != nil || set.Version != 2 {
		t.Fatalf("SetConfig = %v, %v", set, err)
	}
	if _, err := ts.data.SetConfig(ctx, &pb.SetConfigRequest{Namespace: "flags", Key: "alpha", ValueJson: `{"on":1}`}); err != nil {
		t.Fatal(err)
	}
	list, err := ts.data.ListConfig(ctx, &pb.ListConfigRequest{Namespace: "flags"})
	if err != nil || len(list.Entries) != 2 || list.Entries[0].Key != "alpha" || list.Entries[1].Version != 2 {
		t.Fatalf("ListConfig = %v, %v", list, err)
	}
	_, err = ts.data.DeleteConfig(ctx, &pb.DeleteConfigRequest{Namespace: "flags", Key: "beta", ExpectedVersion: proto.Int64(1)})
	wantCode(t, err, codes.Aborted)
	if _, err := ts.data.DeleteConfig(ctx, &pb.DeleteConfigRequest{Namespace: "flags", Key: "beta"}); err != nil {
		t.Fatal(err)
	}
	_, err = ts.data.DeleteConfig(ctx, &pb.DeleteConfigRequest{Namespace: "flags", Key: "beta"})
	wantCode(t, err, codes.NotFound)
	// Four committed changes, four events: beta twice, alpha, beta deleted.
	if n := c.count(t, "catalog", `SELECT count(*) FROM config_outbox`); n != 4 {
		t.Fatalf("config_outbox has %d rows, want 4", n)
	}
}

// A page of large values ends before about 1 MiB, whatever page_size says,
// and paging still returns every item once.
func TestListItemsPageByteBudget(t *testing.T) {
	t.Parallel()
	ts := newTestCluster(t, 1).start(t, false)
	ctx := ctxT(t)
	if _, err := ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: "ivan"}); err != nil {
		t.Fatal(err)
	}
	big := `"` + strings.Repeat("x", 60<<10) + `"`
	for i := range 20 {
		if _, err := ts.data.PutItem(ctx, &pb.PutItemRequest{UserId: "ivan", Collection: "blobs", Key: fmt.Sprintf("b%02d", i), ValueJson: big}); err != nil {
			t.Fatal(err)
		}
	}
	seen, pages, token := 0, 0, ""
	for {
		resp, err := ts.data.ListItems(ctx, &pb.ListItemsRequest{UserId: "ivan", Collection: "blobs", PageSize: 1000, PageToken: token})
		if err != nil {
			t.Fatal(err)
		}
		pages++
		if pages == 1 && (len(resp.Items) == 20 || resp.NextPageToken == "") {
			t.Fatalf("the first page holds %d items of 60 KiB", len(resp.Items))
		}
		seen += len(resp.Items)
		if token = resp.NextPageToken; token == "" {
			break
		}
	}
	if seen != 20 || pages != 2 {
		t.Fatalf("paged %d items in %d pages, want 20 in 2", seen, pages)
	}
}

// ListSessions and ListConfig page like ListItems: every entry once, in
// order, across pages of page_size.
func TestListSessionsAndConfigPaging(t *testing.T) {
	t.Parallel()
	ts := newTestCluster(t, 1).start(t, false)
	ctx := ctxT(t)
	if _, err := ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: "judy"}); err != nil {
		t.Fatal(err)
	}
	for i := range 7 {
		if _, err := ts.data.CreateSession(ctx, &pb.CreateSessionRequest{UserId: "judy", TtlSeconds: 60}); err != nil {
			t.Fatal(err)
		}
		if _, err := ts.data.SetConfig(ctx, &pb.SetConfigRequest{Namespace: "flags", Key: fmt.Sprintf("k%d", i), ValueJson: "1"}); err != nil {
			t.Fatal(err)
		}
	}
	seen := map[string]bool{}
	token, pages := "", 0
	for {
		resp, err := ts.data.ListSessions(ctx, &pb.ListSessionsRequest{UserId: "judy", PageSize: 3, PageToken: token})
		if err != nil {
			t.Fatal(err)
		}
		pages++
		for _, s := range resp.Sessions {
			if seen[s.SessionId] {
				t.Fatalf("session %s listed twice", s.SessionId)
			}
			seen[s.SessionId] = true
		}
		if token = resp.NextPageToken; token == "" {
			break
		}
	}
	if len(seen) != 7 || pages != 3 {
		t.Fatalf("%d sessions in %d pages, want 7 in 3", len(seen), pages)
	}

	var keys []string
	token = ""
	for {
		resp, err := ts.data.ListConfig(ctx, &pb.ListConfigRequest{Namespace: "flags", PageSize: 2, PageToken: token})
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range resp.Entries {
			keys = append(keys, e.Key)
		}
		if token = resp.NextPageToken; token == "" {
			break
		}
	}
	if strings.Join(keys, ",") != "k0,k1,k2,k3,k4,k5,k6" {
		t.Fatalf("config paged as %v", keys)
	}
}

// A TCP forwarder whose two copies are io.Copy between two *net.TCPConn: on Linux that is
// (*TCPConn).ReadFrom, which moves the bytes with splice(2) (socket -> pipe -> socket), the
// path a socket bypass's redirected bytes never reach (docs/bypass-kernel.md).
//
//	splice_proxy LISTEN_ADDR UPSTREAM_ADDR
//
// Prints "ready" once listening. Per connection: each direction is copied until end of file,
// then half-closed on the other side; an error on either direction resets both connections
// (SO_LINGER 0), so a client sees the failure instead of a short stream.
package main

import (
	"fmt"
	"io"
	"net"
	"os"
	"sync"
)

func pipe(dst, src *net.TCPConn, failed func(error)) {
	if _, err := io.Copy(dst, src); err != nil {
		failed(err)
		return
	}
	_ = dst.CloseWrite()
}

func serve(client *net.TCPConn, upstream string) {
	conn, err := net.Dial("tcp", upstream)
	if err != nil {
		fmt.Fprintln(os.Stderr, "dial:", err)
		_ = client.SetLinger(0)
		_ = client.Close()
		return
	}
	server := conn.(*net.TCPConn)
	var once sync.Once
	failed := func(err error) {
		once.Do(func() {
			fmt.Fprintln(os.Stderr, "copy:", err)
			_ = client.SetLinger(0)
			_ = server.SetLinger(0)
			_ = client.Close()
			_ = server.Close()
		})
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); pipe(server, client, failed) }()
	go func() { defer wg.Done(); pipe(client, server, failed) }()
	wg.Wait()
	_ = client.Close()
	_ = server.Close()
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: splice_proxy LISTEN_ADDR UPSTREAM_ADDR")
		os.Exit(2)
	}
	ln, err := net.Listen("tcp", os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, "listen:", err)
		os.Exit(1)
	}
	fmt.Println("ready")
	for {
		c, err := ln.Accept()
		if err != nil {
			fmt.Fprintln(os.Stderr, "accept:", err)
			os.Exit(1)
		}
		go serve(c.(*net.TCPConn), os.Args[2])
	}
}

import ContreeServer
import ContreeTestSupport
import Foundation
import Glibc
import SystemSupport
import Testing

@Suite("serve: bad input gets the spec's error and the server keeps serving", .requiresRoot)
struct BadInputTests {
    @Test("a missing or wrong token is 401 in the error shape")
    func unauthorized() async throws {
        let server = try await TestServer()
        for token in [nil, "not-a-token-of-this-server"] {
            let reply = try await server.request("GET", "/v1/images", token: token)
            #expect(reply.status == 401)
            #expect(try reply.errorMessage().contains("token") || reply.errorMessage().contains("Authorization"))
        }
        let basic = try await server.request("GET", "/v1/whoami", token: nil, headers: ["Authorization": "Basic eDp5"])
        #expect(basic.status == 401)
        #expect(try await server.request("GET", "/v1/whoami").status == 200)
    }

    @Test("another token's images, files and operations are 404, never 403")
    func isolation() async throws {
        let server = try await TestServer()
        let op = try await server.spawn(#"{"command":"echo secret > /s","image":"busybox","shell":true}"#)
        let record = try await server.wait(op)
        let image = try #require(record["result_image_uuid"] as? String)
        let upload = try await server.request("POST", "/v1/files", body: Array("alice's".utf8))
        let sha = try #require(try upload.json()["sha256"] as? String)
        #expect(try await server.request("PATCH", "/v1/images/\(image)/tag", json: #"{"tag":"mine"}"#).status == 200)

        let bob = TestServer.bob
        for (method, path) in [
            ("GET", "/v1/operations/\(op)"), ("GET", "/v1/operations/\(op)/events"), ("DELETE", "/v1/operations/\(op)"),
            ("GET", "/v1/inspect/\(image)/"), ("GET", "/v1/inspect/\(image)/download?path=/s"),
            ("GET", "/v1/inspect/\(image)/list?path=/"), ("GET", "/v1/inspect/\(image)/archive?path=/s"),
            ("DELETE", "/v1/images/\(image)/tag"), ("GET", "/v1/files/\(sha)"), ("HEAD", "/v1/files/\(sha)"),
            ("GET", "/v1/inspect/?tag=mine"),
        ] {
            let reply = try await server.request(method, path, token: bob)
            #expect(reply.status == 404, "\(method) \(path) answered \(reply.status)")
        }
        let tagged = try await server.request("PATCH", "/v1/images/\(image)/tag", token: bob, json: #"{"tag":"x"}"#)
        #expect(tagged.status == 404)
        let spawn = try await server.request(
            "POST", "/v1/instances", token: bob, json: #"{"command":"true","image":"\#(image)"}"#)
        #expect(spawn.status == 404)
        let images = try await server.request("GET", "/v1/images", token: bob)
        #expect(!images.text.contains(image))
        #expect(try await server.request("GET", "/v1/operations", token: bob).jsonArray().isEmpty)
        // Built-in images are everyone's.
        #expect(try await server.request("GET", "/v1/inspect/?tag=busybox", token: bob).status == 302)
    }

    @Test("malformed JSON and wrong types are 400 naming the field")
    func malformed() async throws {
        let server = try await TestServer()
        let cases: [(String, String)] = [
            ("{not json", "not valid JSON"), (#"{"command":"true","image":"busybox","timeout":"soon"}"#, "timeout"),
            (#"{"image":"busybox"}"#, "command"), (#"{"command":"true","image":"busybox","env":[1]}"#, "env"),
            (#"{"command":"true","image":"busybox","files":{"/a":{"uuid":"x","mode":"rwx"}}}"#, "mode"),
            (#"{"command":"true","image":"busybox","stdin":{"value":"%%%","encoding":"base64"}}"#, "base64"),
            (#"{"command":"true","image":"busybox","truncate_output_at":0}"#, "truncate_output_at"),
        ]
        for (body, field) in cases {
            let reply = try await server.request("POST", "/v1/instances", json: body)
            #expect(reply.status == 400, "\(body) answered \(reply.status)")
            #expect(try reply.errorMessage().contains(field), "\(body): \(reply.text)")
        }
        let tag = try await server.request(
            "PATCH", "/v1/images/00000000-0000-0000-0000-000000000000/tag", json: #"{"tag":5}"#)
        #expect(tag.status == 404)  // the image is checked first
        let limit = try await server.request("GET", "/v1/images?limit=0")
        #expect(limit.status == 400)
        let since = try await server.request("GET", "/v1/operations?since=yesterday")
        #expect(since.status == 400)
        #expect(try since.errorMessage().contains("since"))
        #expect(try await server.request("GET", "/v1/whoami").status == 200)
    }

    @Test("path traversal is refused in inspect and in file mappings")
    func traversal() async throws {
        let server = try await TestServer()
        let busybox = try await server.request("GET", "/v1/inspect/?tag=busybox")
        let location = try #require(busybox.headers["location"])
        let image = location.split(separator: "/").last.map(String.init)!
        for path in ["/../../etc/passwd", "/bin/../../..", "/..%2F..%2Fetc"] {
            let reply = try await server.request("GET", "/v1/inspect/\(image)/download?path=\(path)")
            #expect(reply.status == 400 || reply.status == 404, "\(path) answered \(reply.status)")
            #expect(!reply.text.contains("root:x:0:0"))
        }
        // A symlink that points out of the image resolves inside it.
        let op = try await server.spawn(
            #"{"command":"ln -s /../../../../etc/shadow /link","image":"busybox","shell":true}"#)
        let image2 = try #require(try await server.wait(op)["result_image_uuid"] as? String)
        let link = try await server.request("GET", "/v1/inspect/\(image2)/download?path=/link")
        #expect(link.status == 400 || link.status == 404)
        #expect(!link.text.contains("root:"))
        let upload = try await server.request("POST", "/v1/files", body: [1, 2, 3])
        let uuid = try #require(try upload.json()["uuid"] as? String)
        for target in ["/tmp/../../etc/x", "relative/path", "/a/../../b"] {
            let reply = try await server.request(
                "POST", "/v1/instances",
                json: #"{"command":"true","image":"busybox","files":{"\#(target)":{"uuid":"\#(uuid)"}}}"#)
            #expect(reply.status == 400, "\(target) answered \(reply.status)")
        }
    }

    @Test("an upload whose body does not match its claimed sha256 stores nothing")
    func shaMismatch() async throws {
        let server = try await TestServer()
        let claimed = String(repeating: "ab", count: 32)
        let reply = try await server.request("POST", "/v1/files?sha256=\(claimed)", body: Array("hello".utf8))
        #expect(reply.status == 400)
        #expect(try reply.errorMessage().contains(claimed))
        #expect(try await server.request("GET", "/v1/files/\(claimed)").status == 404)
        #expect(try await server.request("GET", "/v1/files").json()["files"].map { ($0 as! [Any]).isEmpty } == true)
        let leftovers = try FileSystem.list(server.home + "/files")
        #expect(leftovers.isEmpty, "\(leftovers)")
        // The right claim, chunked, is stored once and found by its sha256.
        let body = Array(repeating: UInt8(7), count: 5000)
        let sha = "d00b0bec0ab5b5c1ab1e09e2a19ed11e4c2cd81e89af8b6e0c86d7d78c2b5b1d"
        _ = sha
        let first = try await server.request("POST", "/v1/files", body: body, chunked: true)
        #expect(first.status == 201)
        let object = try first.json()
        let digest = try #require(object["sha256"] as? String)
        #expect(object["size"] as? Int == 5000)
        let again = try await server.request("POST", "/v1/files?sha256=\(digest)", body: body)
        #expect(try again.json()["uuid"] as? String == object["uuid"] as? String)
        let file = try await server.request("GET", "/v1/files/\(digest)").json()
        #expect(file["created_at"] is String && file["updated_at"] is String && file["size"] as? Int == 5000)
        #expect(try await server.request("HEAD", "/v1/files/\(digest)").status == 200)
    }

    @Test("an unknown image is 404, a timeout beyond the limit 400, cancelling a finished operation 409")
    func references() async throws {
        let server = try await TestServer()
        for image in ["no-such-tag", "tag:nothing", "12345678-1234-1234-1234-123456789abc"] {
            let reply = try await server.request(
                "POST", "/v1/instances", json: #"{"command":"true","image":"\#(image)"}"#)
            #expect(reply.status == 404, "\(image): \(reply.text)")
        }
        let tooLong = try await server.request(
            "POST", "/v1/instances", token: TestServer.bob, json: #"{"command":"true","image":"busybox","timeout":31}"#)
        #expect(tooLong.status == 400)
        #expect(try tooLong.errorMessage().contains("30"))
        let op = try await server.spawn(#"{"command":"true","image":"busybox"}"#)
        _ = try await server.wait(op)
        let cancel = try await server.request("DELETE", "/v1/operations/\(op)")
        #expect(cancel.status == 409)
        #expect(try await server.request("GET", "/v1/operations/\(op)").json()["status"] as? String == "SUCCESS")
        #expect(try await server.request("GET", "/v1/operations/not-a-uuid").status == 404)
        #expect(try await server.request("GET", "/v1/nowhere").status == 404)
        let malformed = try await server.request(
            "POST", "/v1/images/import", json: #"{"registry":{"url":"docker://x"}}"#)
        #expect(malformed.status == 400)
        #expect(try malformed.errorMessage().contains("host"))
        // No registry is reachable until the operator names one (serve --registry).
        let importing = try await server.request(
            "POST", "/v1/images/import", json: #"{"registry":{"url":"docker://127.0.0.1:1/x/y:z"},"tag":null}"#)
        #expect(importing.status == 403)
        #expect(try importing.errorMessage().contains("serve --registry"))
    }
}

@Suite("serve: what one token can do does not take the server down", .requiresRoot)
struct RobustnessTests {
    @Test("grep refuses patterns that would blow up the matcher, and streams large files")
    func grepLimits() async throws {
        let server = try await TestServer()
        let op = try await server.spawn(
            #"{"command":"yes yes | head -c 4000000 > /big; echo needle >> /big","image":"busybox","shell":true}"#)
        let image = try #require(try await server.wait(op)["result_image_uuid"] as? String)
        for pattern in ["(((a{0,50}){0,50}){0,50}){0,10}", "(a)\\1", "((x{0,100}){0,100})"] {
            let encoded = pattern.addingPercentEncoding(withAllowedCharacters: .alphanumerics)!
            let reply = try await server.request("GET", "/v1/inspect/\(image)/grep?path=/big&pattern=\(encoded)")
            #expect(reply.status == 400, "\(pattern): \(reply.status)")
        }
        let needle = try await server.request("GET", "/v1/inspect/\(image)/grep?path=/big&pattern=needle")
        let matches = try #require(try needle.json()["matches"] as? [[String: Any]])
        #expect(matches.count == 1 && matches[0]["line_number"] as? Int == 1_000_001)
        let every = try await server.request("GET", "/v1/inspect/\(image)/grep?path=/big&pattern=%5E&max_total=3")
        #expect(try every.json()["truncated"] as? Bool == true)
        #expect((try every.json()["matches"] as? [Any])?.count == 3)
    }

    @Test("a run that nests directories deeply fails or succeeds, and serve keeps serving")
    func deepTree() async throws {
        let server = try await TestServer()
        let op = try await server.spawn(
            #"{"command":"cd /tmp; i=0; while [ $i -lt 1500 ]; do mkdir a; cd a; i=$((i+1)); done","image":"busybox","shell":true}"#
        )
        let record = try await server.wait(op)
        #expect(["SUCCESS", "FAILED"].contains(record["status"] as? String ?? ""))
        #expect(try await server.request("GET", "/v1/whoami").status == 200)
        if let image = record["result_image_uuid"] as? String {
            let archive = try await server.request("GET", "/v1/inspect/\(image)/archive?path=/tmp")
            #expect(archive.status == 200 || archive.status == 400)
            #expect(try await server.request("GET", "/v1/whoami").status == 200)
        }
    }

    @Test("stdin the spawn sent is never lost when the client closes stdin at once; SIGSTOP is refused")
    func stdinOrderAndStop() async throws {
        let server = try await TestServer()
        for _ in 0..<5 {
            let op = try await server.spawn(
                #"{"command":"cat","image":"busybox","stdin":{"value":"piped\n","close":false}}"#)
            var closed = false
            for _ in 0..<6000 {
                let reply = try await server.request(
                    "POST", "/v1/operations/\(op)/subprocesses/1/stdin", json: #"{"value":"","close":true}"#)
                if reply.status == 204 {
                    closed = true
                    break
                }
                try await Task.sleep(for: .milliseconds(10))
            }
            #expect(closed)
            #expect(try await server.wait(op)[path: "metadata.result.stdout.value"] as? String == "piped\n")
        }
        // Long enough that a loaded machine cannot end it before the cancel below.
        let op = try await server.spawn(#"{"command":"sleep 300","image":"busybox","shell":true}"#)
        for signal in ["STOP", "SIGSTOP", "19"] {
            let reply = try await server.request("DELETE", "/v1/operations/\(op)/subprocesses/1?signal=\(signal)")
            #expect(reply.status == 400, "\(signal): \(reply.status)")
        }
        #expect(try await server.request("DELETE", "/v1/operations/\(op)").status == 202)
        #expect(try await server.wait(op)["status"] as? String == "CANCELLED")
    }

    @Test("a tag lookup never starts a build; a second serve on the same store is refused")
    func lookupsAndLock() async throws {
        let server = try await TestServer()
        let lookup = try await server.request("GET", "/v1/inspect/?tag=debian:bookworm%2Bhello")
        #expect(lookup.status == 404)
        // No build began: a build of a built-in image takes its lock file first.
        #expect(!FileSystem.exists(server.home + "/builtin-debian_bookworm+hello.lock"))
        let env =
            ChildProcess.hostEnvironment().filter { !$0.hasPrefix("CONTREE_HOME=") } + [
                "CONTREE_HOME=\(server.home)"
            ]
        await #expect(throws: (any Error).self) {
            _ = try await ServeProcess.start(binary: Paths.cli, tokens: server.tokensPath, environment: env)
        }
    }
}

@Suite("serve: instances, events and operations", .requiresRoot)
struct InstanceTests {
    @Test("a run streams its events, ends with completion, resumes after Last-Event-Id, and its record is complete")
    func eventsAndRecord() async throws {
        let server = try await TestServer()
        let op = try await server.spawn(
            #"{"command":"echo out; echo err >&2; echo data > /made; exit 3","image":"tag:busybox","shell":true,"hostname":"box","truncate_output_at":2}"#
        )
        let events = try await server.events(op)
        let types = events.map { $0["type"] as! String }
        #expect(types.first == "init" && types.last == "completion")
        #expect(types.contains("spawn") && types.contains("exit") && types.contains("truncated"))
        #expect(events.allSatisfy { $0["ts"] is String && $0["id"] is Int && $0["data"] != nil })
        let exit = try #require(events.first { $0["type"] as? String == "exit" })
        #expect(exit["spid"] as? Int == 1 && exit[path: "data.code"] as? Int == 3)
        let streamed = events.filter { $0["type"] as? String == "stdout" }.compactMap {
            $0[path: "data.value"] as? String
        }
        #expect(streamed.joined() == "ou")  // capped at truncate_output_at

        let ids = events.map { $0["id"] as! Int }
        let tail = try await server.events(op, query: "", headers: ["Last-Event-Id": String(ids[2])])
        #expect(tail.map { $0["id"] as! Int } == Array(ids.dropFirst(3)))
        let onlyMain = try await server.events(op, query: "spid=1")
        #expect(onlyMain.allSatisfy { $0["spid"] as? Int == 1 })

        let record = try await server.request("GET", "/v1/operations/\(op)").json()
        #expect(record["status"] as? String == "SUCCESS" && record["duration"] is Double)
        #expect(record[path: "metadata.result.state.exit_code"] as? Int == 3)
        #expect(record[path: "metadata.result.stdout.value"] as? String == "ou")
        #expect(record[path: "metadata.result.stdout.truncated"] as? Bool == true)
        #expect(record[path: "metadata.hostname"] as? String == "box")
        let resources = try #require(record[path: "metadata.result.resources"] as? [String: Any])
        #expect(resources.count == 16)
        let image = try #require(record[path: "result.image"] as? String)
        #expect(record["result"].map { ($0 as! [String: Any]).keys.sorted() } == ["image", "tag"])
        let file = try await server.request("GET", "/v1/inspect/\(image)/download?path=/made")
        #expect(file.text == "data\n")
        let list = try await server.request("GET", "/v1/operations?status=SUCCESS&kind=instance&since=1h")
        #expect(try list.jsonArray().contains { $0["uuid"] as? String == op })
    }

    @Test("stdin left open is written through the API; the main process can be signalled")
    func stdinAndSignals() async throws {
        let server = try await TestServer()
        let op = try await server.spawn(
            #"{"command":"cat; echo done","image":"busybox","shell":true,"stdin":{"value":"first ","close":false}}"#)
        var written = 0
        for _ in 0..<6000 {
            let reply = try await server.request(
                "POST", "/v1/operations/\(op)/subprocesses/1/stdin",
                json: #"{"value":"c2Vjb25k","encoding":"base64","close":true}"#)
            if reply.status == 204 {
                written += 1
                break
            }
            try await Task.sleep(for: .milliseconds(20))
        }
        #expect(written == 1)
        let record = try await server.wait(op)
        #expect(record[path: "metadata.result.stdout.value"] as? String == "first seconddone\n")
        let again = try await server.request(
            "POST", "/v1/operations/\(op)/subprocesses/1/stdin", json: #"{"value":"x"}"#)
        #expect(again.status == 410)

        let sleeper = try await server.spawn(
            #"{"command":"trap 'echo got TERM; exit 5' TERM; echo ready >&2; while :; do sleep 0.1; done","image":"busybox","shell":true}"#
        )
        try await server.waitForOutput(sleeper, spid: 1, "ready")
        let kill = try await server.request("DELETE", "/v1/operations/\(sleeper)/subprocesses/1?signal=SIGTERM")
        #expect(kill.status == 204)
        let ended = try await server.wait(sleeper)
        #expect(ended[path: "metadata.result.state.exit_code"] as? Int == 5)
        #expect(ended[path: "metadata.result.stdout.value"] as? String == "got TERM\n")
        #expect(
            try await server.request("DELETE", "/v1/operations/\(sleeper)/subprocesses/1?signal=BOGUS").status == 400)
    }

    @Test("more processes start in a running instance, share its files and pid namespace, take stdin and signals")
    func subprocesses() async throws {
        let server = try await TestServer()
        let op = try await server.spawn(
            // Lives until the test cancels it (a loaded machine may take long to get there).
            #"{"command":"echo shared > /tmp/s && mv /tmp/s /shared; sleep 300","image":"busybox","shell":true,"hostname":"inst","timeout":600}"#
        )
        var spid: Int?
        for _ in 0..<6000 {
            let reply = try await server.request(
                "POST", "/v1/operations/\(op)/subprocesses",
                json:
                    #"{"command":"while [ ! -e /shared ]; do sleep 0.01; done; cat /shared; hostname; echo $X; ps","shell":true,"env":{"X":"y"}}"#
            )
            if reply.status == 201 {
                spid = try reply.json()["spid"] as? Int
                #expect(reply.headers["location"] == "/v1/operations/\(op)/subprocesses/\(spid ?? 0)")
                break
            }
            #expect(reply.status == 425, "\(reply.status) \(reply.text)")
            try await Task.sleep(for: .milliseconds(20))
        }
        #expect(spid == 2)
        var result: [String: Any] = [:]
        for _ in 0..<6000 {
            result = try await server.request("GET", "/v1/operations/\(op)/subprocesses/2").json()
            if result[path: "state.exit_code"] as? Int != -1 { break }
            try await Task.sleep(for: .milliseconds(20))
        }
        let out = result[path: "stdout.value"] as? String ?? ""
        #expect(out.hasPrefix("shared\ninst\ny\n") && out.contains("sleep 300"), "\(out)")

        // stdin kept open, then closed; a signal to a started process.
        let cat = try await server.request(
            "POST", "/v1/operations/\(op)/subprocesses", json: #"{"command":"cat","stdin":{"value":"a","close":false}}"#
        )
        let catSpid = try #require(try cat.json()["spid"] as? Int)
        let write = try await server.request(
            "POST", "/v1/operations/\(op)/subprocesses/\(catSpid)/stdin", json: #"{"value":"b","close":true}"#)
        #expect(write.status == 204)
        let looper = try await server.request(
            "POST", "/v1/operations/\(op)/subprocesses",
            json:
                #"{"command":"trap 'echo bye; exit 4' TERM; echo ready >&2; while :; do sleep 0.1; done","shell":true}"#
        )
        let looperSpid = try #require(try looper.json()["spid"] as? Int)
        try await server.waitForOutput(op, spid: looperSpid, "ready")
        let kill = try await server.request("DELETE", "/v1/operations/\(op)/subprocesses/\(looperSpid)?signal=TERM")
        #expect(kill.status == 204)
        for (spid, expected, code) in [(catSpid, "ab", 0), (looperSpid, "bye\n", 4)] {
            var done: [String: Any] = [:]
            for _ in 0..<6000 {
                done = try await server.request("GET", "/v1/operations/\(op)/subprocesses/\(spid)").json()
                if done[path: "state.exit_code"] as? Int != -1 { break }
                try await Task.sleep(for: .milliseconds(20))
            }
            #expect(done[path: "stdout.value"] as? String == expected)
            #expect(done[path: "state.exit_code"] as? Int == code)
        }
        let events = try await server.events(op, query: "spid=\(catSpid)")
        let types = events.map { $0["type"] as! String }
        #expect(
            types.first == "spawn" && types.last == "exit" && types.dropFirst().dropLast().allSatisfy { $0 == "stdout" }
        )
        #expect(try await server.request("GET", "/v1/operations/\(op)/subprocesses/99").status == 404)
        #expect(try await server.request("DELETE", "/v1/operations/\(op)/subprocesses/99").status == 404)

        #expect(try await server.request("DELETE", "/v1/operations/\(op)").status == 202)
        _ = try await server.wait(op)
        let late = try await server.request("POST", "/v1/operations/\(op)/subprocesses", json: #"{"command":"true"}"#)
        #expect(late.status == 409)
    }

    @Test("cancel stops a running instance; a queued one waits for the token's concurrency limit")
    func cancelAndQueue() async throws {
        // bob's only slot, and a timeout no loaded machine reaches before the cancel: with 30 s,
        // the first instance once timed out (SUCCESS) before the test got to cancel it.
        let bob = TestServer.bob
        let server = try await TestServer(tokens: "bob \(bob) max_concurrency=1 max_timeout=600 import=1\n")
        let first = try await server.spawn(
            #"{"command":"echo started >&2; sleep 600","image":"busybox","shell":true}"#, token: bob)
        // The first holds bob's only slot before the second is asked for. What it wrote, not its
        // spawn event (which names the command, and so "started", before it runs).
        let asked = Date()
        var running = false
        while !running && Date().timeIntervalSince(asked) < 120 {
            let events = try await server.request("GET", "/v1/operations/\(first)/events?spid=1", token: bob)
            running = events.text.contains(#""value":"started"#)
            if !running { try await Task.sleep(for: .milliseconds(20)) }
        }
        try #require(running, "the first instance started")
        let second = try await server.spawn(#"{"command":"echo second","image":"busybox","shell":true}"#, token: bob)
        // Not a synchronisation: the window in which a second instance, wrongly, could start.
        try await Task.sleep(for: .milliseconds(500))
        #expect(
            try await server.request("GET", "/v1/operations/\(second)", token: bob).json()["status"] as? String
                == "PENDING")
        let who = try await server.request("GET", "/v1/whoami", token: bob).json()
        #expect(who[path: "limits.instance_max_concurrency"] as? Int == 1)
        #expect(who[path: "limits.instance_max_timeout"] as? Int == 600)
        #expect(try await server.request("DELETE", "/v1/operations/\(first)", token: bob).status == 202)
        let cancelled = try await server.wait(first, token: bob)
        #expect(cancelled["status"] as? String == "CANCELLED", "\(cancelled)")
        let done = try await server.wait(second, token: bob)
        #expect(done[path: "metadata.result.stdout.value"] as? String == "second\n")
    }

    @Test("shell=false sees only the request's env; preserve_env and preserve_cwd make a new image with them")
    func environmentAndConfig() async throws {
        let server = try await TestServer()
        let op = try await server.spawn(#"{"command":"env","image":"busybox","env":{"ONLY":"me"}}"#)
        let env = try await server.wait(op)[path: "metadata.result.stdout.value"] as? String ?? ""
        #expect(env.contains("ONLY=me") && !env.contains("HOME=/root"))
        let keep = try await server.spawn(
            #"{"command":"true","image":"busybox","shell":true,"env":{"KEPT":"yes","HOME":null},"cwd":"/work","preserve_env":true,"preserve_cwd":true}"#
        )
        let image = try #require(try await server.wait(keep)["result_image_uuid"] as? String)
        let check = try await server.spawn(#"{"command":"echo $KEPT:$HOME:$(pwd)","image":"\#(image)","shell":true}"#)
        #expect(try await server.wait(check)[path: "metadata.result.stdout.value"] as? String == "yes::/work\n")
    }

    @Test("stopping serve (SIGTERM) cancels what runs, closes the streams with completion, and exits")
    func gracefulStop() async throws {
        let server = try await TestServer()
        let op = try await server.spawn(#"{"command":"sleep 60","image":"busybox","shell":true}"#)
        // Stop only once the stream is open and has seen the command start.
        let (spawned, seen) = AsyncStream<Void>.makeStream()
        let port = server.port
        let stream = Task {
            defer { seen.finish() }  // never leaves the wait below hanging
            return try await BlockingPool.shared.run {
                var received = ""
                return try LoopbackHTTP.exchange(
                    port: port, method: "GET", path: "/v1/operations/\(op)/events?follow=1", token: TestServer.alice
                ) { chunk in
                    received += String(decoding: chunk, as: UTF8.self)
                    if received.contains("event: spawn") { seen.yield() }
                }
            }
        }
        for await _ in spawned { break }
        let started = ContinuousClock.now
        try await server.stop(signal: SIGTERM)
        #expect(ContinuousClock.now - started < .seconds(45))  // the instance sleeps 60 s; a hang never ends
        let frames = try await stream.value.text
        #expect(frames.contains(#""type":"completion""#) && frames.contains(#""status":"CANCELLED""#))
        try await server.start()
        let record = try await server.request("GET", "/v1/operations/\(op)").json()
        #expect(record["status"] as? String == "CANCELLED")
        #expect((record["error"] as? String ?? "").contains("stopped"))
    }

    @Test("operations outlive serve; one in flight when it dies becomes FAILED with a reason")
    func restart() async throws {
        let server = try await TestServer()
        let done = try await server.spawn(#"{"command":"echo kept","image":"busybox","shell":true}"#)
        _ = try await server.wait(done)
        let running = try await server.spawn(#"{"command":"sleep 60","image":"busybox","shell":true}"#)
        for _ in 0..<3000 {
            if try await server.request("GET", "/v1/operations/\(running)").json()["status"] as? String == "EXECUTING" {
                break
            }
            try await Task.sleep(for: .milliseconds(20))
        }
        try await server.stop(signal: SIGKILL)
        try await server.start()
        let kept = try await server.request("GET", "/v1/operations/\(done)").json()
        #expect(kept[path: "metadata.result.stdout.value"] as? String == "kept\n")
        let failed = try await server.request("GET", "/v1/operations/\(running)").json()
        #expect(failed["status"] as? String == "FAILED")
        #expect((failed["error"] as? String ?? "").contains("stopped"))
        let events = try await server.events(running)
        #expect(events.last?["type"] as? String == "completion")
        // The store is consistent after the crash.
        let env =
            ChildProcess.hostEnvironment().filter { !$0.hasPrefix("CONTREE_HOME=") } + [
                "CONTREE_HOME=\(server.home)"
            ]
        let fsck = try await BlockingPool.shared.run { try ChildProcess.run([Paths.cli, "fsck"], environment: env) }
        #expect(fsck.status == 0, "\(fsck.stderrText)")
    }
}

@Suite("serve: images from a registry", .requiresRoot)
struct ImportTests {
    @Test("POST /images/import pulls from a registry on loopback into the namespace, tagged, and runs it")
    func importFromRegistry() async throws {
        let registry = try await BlockingPool.shared.run { try LocalRegistry() }
        let server = try await TestServer(arguments: ["--registry", "127.0.0.1:\(registry.port)"])
        let env =
            ChildProcess.hostEnvironment().filter { !$0.hasPrefix("CONTREE_HOME=") } + ["CONTREE_HOME=\(server.home)"]
        let layout = server.home + "/layout"
        let export = try await BlockingPool.shared.run {
            try ChildProcess.run([Paths.cli, "image", "export", "busybox", "oci:\(layout):v1"], environment: env)
        }
        #expect(export.status == 0, "\(export.stderrText)")
        let push = try await BlockingPool.shared.run {
            try ChildProcess.run([
                "skopeo", "copy", "--dest-tls-verify=false", "oci:\(layout):v1",
                "docker://127.0.0.1:\(registry.port)/lib/box:1",
            ])
        }
        #expect(push.status == 0, "\(push.stderrText)")
        let reply = try await server.request(
            "POST", "/v1/images/import",
            json: #"{"registry":{"url":"docker://127.0.0.1:\#(registry.port)/lib/box:1"},"tag":"box:1"}"#)
        #expect(reply.status == 202)
        let op = try #require(try reply.json()["uuid"] as? String)
        let record = try await server.wait(op)
        #expect(record["kind"] as? String == "image_import" && record["status"] as? String == "SUCCESS")
        #expect(record[path: "result.tag"] as? String == "box:1")
        #expect(record[path: "metadata.registry.url"] as? String == "docker://127.0.0.1:\(registry.port)/lib/box:1")
        let image = try #require(record[path: "result.image"] as? String)
        #expect(
            try await server.request("GET", "/v1/inspect/?tag=box:1").headers["location"] == "/v1/inspect/\(image)/")
        #expect(try await server.request("GET", "/v1/inspect/?tag=box:1", token: TestServer.bob).status == 404)
        let run = try await server.spawn(#"{"command":"echo from the registry","image":"tag:box:1","shell":true}"#)
        #expect(try await server.wait(run)[path: "metadata.result.stdout.value"] as? String == "from the registry\n")
        // A spawn may name the registry image itself (imported on first use); a host path may not.
        let direct = try await server.spawn(
            #"{"command":"echo direct","image":"docker://127.0.0.1:\#(registry.port)/lib/box:1","shell":true}"#,
            token: TestServer.bob)
        #expect(
            try await server.wait(direct, token: TestServer.bob)[path: "metadata.result.stdout.value"] as? String
                == "direct\n")
        let local = try await server.request(
            "POST", "/v1/instances", json: #"{"command":"true","image":"oci:\#(layout):v1"}"#)
        #expect(local.status == 404)
    }

    @Test("cancelling an import stops its download at once; the operation is CANCELLED and nothing is left")
    func cancelImport() async throws {
        let registry = try await BlockingPool.shared.run { try LocalRegistry() }
        // An image with a layer the server's store lacks (it holds busybox's): 256 KiB of noise.
        let home = "/tmp/contree-elsewhere-" + UUID().uuidString.lowercased().prefix(12)
        defer { try? FileSystem.removeTree(home) }
        let env = ChildProcess.hostEnvironment().filter { !$0.hasPrefix("CONTREE_HOME=") } + ["CONTREE_HOME=\(home)"]
        let layout = home + "/layout"
        let pushed = try await BlockingPool.shared.run {
            _ = try ChildProcess.run(
                [
                    Paths.cli, "exec", "--tag", "noise", "--", "dd", "if=/dev/urandom", "of=/noise", "bs=1k",
                    "count=256",
                ],
                environment: env)
            let export = try ChildProcess.run(
                [Paths.cli, "image", "export", "noise", "oci:\(layout):v1"], environment: env)
            let push = try ChildProcess.run([
                "skopeo", "copy", "--dest-tls-verify=false", "oci:\(layout):v1",
                "docker://127.0.0.1:\(registry.port)/lib/box:1",
            ])
            return export.succeeded && push.succeeded
        }
        #expect(pushed)
        let proxy = try await BlockingPool.shared.run { try StallingProxy(upstreamPort: registry.port) }
        let server = try await TestServer(arguments: ["--registry", "127.0.0.1:\(proxy.port)"])
        let reply = try await server.request(
            "POST", "/v1/images/import",
            json: #"{"registry":{"url":"docker://127.0.0.1:\#(proxy.port)/lib/box:1"},"tag":"box:1","timeout":600}"#)
        let op = try #require(try reply.json()["uuid"] as? String)
        // Once it executes (the download stalls), cancel it.
        var status = ""
        let started = Date()
        while status != "EXECUTING" && Date().timeIntervalSince(started) < 30 {
            try await Task.sleep(for: .milliseconds(100))
            status = try await server.request("GET", "/v1/operations/\(op)").json()["status"] as? String ?? ""
        }
        try #require(status == "EXECUTING", "the import started")
        try await Task.sleep(for: .milliseconds(500))
        let cancelled = Date()
        #expect(try await server.request("DELETE", "/v1/operations/\(op)").status < 300)
        let record = try await server.wait(op)
        #expect(record["status"] as? String == "CANCELLED")
        #expect(Date().timeIntervalSince(cancelled) < 20)  // not the proxy's minute
        #expect(try await server.request("GET", "/v1/inspect/?tag=box:1").status == 404)
        // The import's lease and its download directory are gone by the time the operation ended.
        let leftovers = try await BlockingPool.shared.run {
            try ChildProcess.run(["find", server.home + "/tmp", "-name", "pull"]).stdout
        }
        #expect(leftovers.isEmpty, "\(String(decoding: leftovers, as: UTF8.self))")
    }
}

@Suite("serve: inspect", .requiresRoot)
struct InspectTests {
    @Test("list (JSON and text), download, archive, grep and tags over a run's image")
    func inspect() async throws {
        let server = try await TestServer()
        let op = try await server.spawn(
            #"{"command":"mkdir -p /d/sub && printf 'alpha\nbeta\ngamma\n' > /d/a.txt && echo beta > /d/sub/b.conf && ln -s a.txt /d/l","image":"busybox","shell":true}"#
        )
        let image = try #require(try await server.wait(op)["result_image_uuid"] as? String)
        let list = try await server.request("GET", "/v1/inspect/\(image)/list?path=/d").json()
        let files = try #require(list["files"] as? [[String: Any]])
        #expect(Set(files.compactMap { $0["path"] as? String }) == ["a.txt", "sub", "l"])
        #expect(files.allSatisfy { $0.count == 15 })
        #expect(files.first { $0["path"] as? String == "l" }?["symlink_to"] as? String == "a.txt")
        let text = try await server.request("GET", "/v1/inspect/\(image)/list?path=/d&text")
        #expect(text.status == 200 && text.text.contains("a.txt") && text.text.hasPrefix("total"))
        #expect(try await server.request("GET", "/v1/inspect/\(image)/download?path=/d").status == 422)
        #expect(
            try await server.request("GET", "/v1/inspect/\(image)/download?path=/d/l").text == "alpha\nbeta\ngamma\n")
        let archive = try await server.request("GET", "/v1/inspect/\(image)/archive?path=/d")
        #expect(archive.status == 200 && archive.body.count % 512 == 0 && archive.text.contains("d/sub/b.conf"))
        let grep = try await server.request("GET", "/v1/inspect/\(image)/grep?pattern=bet.&path=/d&after=1")
        let matches = try #require(try grep.json()["matches"] as? [[String: Any]])
        #expect(matches.filter { $0["type"] as? String == "match" }.count == 2)
        #expect(matches.contains { $0["type"] as? String == "context" && $0["line_text"] as? String == "gamma\n" })
        let globbed = try await server.request(
            "GET", "/v1/inspect/\(image)/grep?pattern=BETA&case=insensitive&glob=*.conf&path=/d")
        #expect((try globbed.json()["matches"] as? [[String: Any]])?.count == 1)
        // Tags: set, find (302), move, remove.
        #expect(
            try await server.request("PATCH", "/v1/images/\(image)/tag", json: #"{"tag":"proj/x:1"}"#).status == 200)
        let found = try await server.request("GET", "/v1/inspect/?tag=proj%2Fx%3A1")
        #expect(found.status == 302 && found.headers["location"] == "/v1/inspect/\(image)/")
        #expect(try await server.request("GET", "/v1/inspect/\(image)").status == 307)
        let listed = try await server.request(
            "GET", "/v1/images?tag=proj/&until=\(Int(Date().timeIntervalSince1970) + 60)")
        #expect(listed.text.contains(image))
        #expect(try await server.request("DELETE", "/v1/images/\(image)/tag?tag=proj/x:1").status == 200)
        #expect(try await server.request("GET", "/v1/inspect/?tag=proj/x:1").status == 404)
    }
}

@Suite("serve: the image list", .requiresRoot)
struct ImageListTests {
    @Test(
        "one entry per tag or one untagged, newest first, the built-in images, filters, pages that add up; nothing of another token"
    )
    func list() async throws {
        let server = try await TestServer()
        var images: [String] = []
        for i in 0..<4 {
            let op = try await server.spawn(#"{"command":"echo \#(i) > /n","image":"busybox","shell":true}"#)
            images.append(try #require(try await server.wait(op)["result_image_uuid"] as? String))
        }
        for (image, tag) in [(images[1], "proj/a"), (images[1], "proj/b"), (images[3], "other")] {
            #expect(
                try await server.request("PATCH", "/v1/images/\(image)/tag", json: #"{"tag":"\#(tag)"}"#).status == 200)
        }
        func entries(_ query: String, token: String = TestServer.alice) async throws -> [(uuid: String, tag: String?)] {
            let reply = try await server.request("GET", "/v1/images" + query, token: token)
            #expect(reply.status == 200, "\(query): \(reply.text)")
            let list = try #require(try reply.json()["images"] as? [[String: Any]])
            return list.map { ($0["uuid"] as? String ?? "", $0["tag"] as? String) }
        }
        let all = try await entries("")
        // Newest first: the four runs' images, the tagged one once per tag, then busybox (built
        // before them).
        let ours = all.filter { images.contains($0.uuid) }
        #expect(ours.map(\.uuid) == [images[3], images[2], images[1], images[1], images[0]])
        #expect(Set(ours.filter { $0.uuid == images[1] }.compactMap(\.tag)) == ["proj/a", "proj/b"])
        #expect(ours.first?.tag == "other" && ours[1].tag == nil)
        #expect(all.contains { $0.tag == "busybox" })
        // Pages of two add up to the whole list, in the same order.
        var paged: [String] = []
        for offset in stride(from: 0, to: all.count + 2, by: 2) {
            paged += try await entries("?limit=2&offset=\(offset)").map { $0.uuid + ($0.tag ?? "") }
        }
        #expect(paged == all.map { $0.uuid + ($0.tag ?? "") })
        #expect(Set(try await entries("?tagged=1").compactMap(\.tag)).isSuperset(of: ["proj/a", "proj/b", "other"]))
        #expect(try await entries("?tagged=1").allSatisfy { $0.tag != nil })
        #expect(Set(try await entries("?tag=proj/").compactMap(\.tag)) == ["proj/a", "proj/b"])
        #expect(try await entries("?uuid=\(images[2])").map(\.uuid) == [images[2]])
        #expect(try await entries("?since=2100-01-01T00:00:00Z").isEmpty)
        // Another token sees the built-in images and nothing of alice's.
        let bobs = try await entries("", token: TestServer.bob)
        #expect(bobs.contains { $0.tag == "busybox" } && !bobs.contains { images.contains($0.uuid) })
    }
}

@Suite(
    "serve --isolation vm: instances run in QEMU microvms", .requiresRoot,
    .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-system-x86_64"), "needs qemu-system-x86"))
struct VMServeTests {
    @Test("a spawn runs in a VM (Debian's kernel answers uname), and its image is the next spawn's root")
    func vm() async throws {
        let home = "/tmp/contree-serve-test-" + UUID().uuidString.lowercased().prefix(12)
        try FileSystem.makeDirectories(home)
        // The guest kernel, KVM probe and templates the VM tests keep between runs.
        try FileSystem.makeDirectories("/var/tmp/contree-vm-tests/vm")
        guard symlink("/var/tmp/contree-vm-tests/vm", home + "/vm") == 0 else { throw SandboxError.system("symlink") }
        let server = try await TestServer(home: home, arguments: ["--isolation", "vm"])
        let first = try await server.spawn(
            #"{"command":"uname -r; echo kept > /kept","image":"busybox","shell":true,"disposable":false,"timeout":120}"#
        )
        let record = try await server.wait(first)
        #expect(record["status"] as? String == "SUCCESS", "\(record)")
        let stdout = record[path: "metadata.result.stdout.value"] as? String ?? ""
        #expect(stdout.hasSuffix("-amd64\n") && !stdout.contains(hostKernelRelease()), "\(stdout)")
        let image = try #require(record["result_image_uuid"] as? String)
        let second = try await server.spawn(#"{"command":"cat /kept","image":"\#(image)","shell":true,"timeout":120}"#)
        #expect(try await server.wait(second)[path: "metadata.result.stdout.value"] as? String == "kept\n")
        // A running VM instance is EXECUTING and takes signals.
        let sleeper = try await server.spawn(
            #"{"command":"trap 'echo got TERM; exit 5' TERM; echo ready >&2; while :; do sleep 0.1; done","image":"busybox","shell":true,"timeout":120}"#
        )
        try await server.waitForOutput(sleeper, spid: 1, "ready")
        #expect(try await server.request("GET", "/v1/operations/\(sleeper)").json()["status"] as? String == "EXECUTING")
        #expect(
            try await server.request("DELETE", "/v1/operations/\(sleeper)/subprocesses/1?signal=SIGTERM").status == 204)
        let ended = try await server.wait(sleeper)
        #expect(ended[path: "metadata.result.state.exit_code"] as? Int == 5, "\(ended)")
        #expect(ended[path: "metadata.result.stdout.value"] as? String == "got TERM\n")
    }
}

extension VMServeTests {
    /// Starts `command` in `operation` (a subprocess) and returns its spid.
    private func exec(_ server: TestServer, _ operation: String, _ command: String) async throws -> Int {
        let reply = try await server.request(
            "POST", "/v1/operations/\(operation)/subprocesses", json: #"{"command":"\#(command)","shell":true}"#)
        guard reply.status == 201, let spid = try reply.json()["spid"] as? Int else {
            throw TestFailure("exec failed: \(reply.status) \(reply.text)")
        }
        return spid
    }

    @Test(
        "VM instances take subprocess calls; the extension snapshots a running instance with its memory and spawns instances that resume it"
    )
    func memorySnapshots() async throws {
        let home = "/tmp/contree-serve-test-" + UUID().uuidString.lowercased().prefix(12)
        try FileSystem.makeDirectories(home)
        try FileSystem.makeDirectories("/var/tmp/contree-vm-tests/vm")
        guard symlink("/var/tmp/contree-vm-tests/vm", home + "/vm") == 0 else { throw SandboxError.system("symlink") }
        let server = try await TestServer(home: home, arguments: ["--isolation", "vm"])
        // The count lives only in the server's memory; each connection gets the next number.
        let counter = try await server.spawn(
            #"{"command":"i=0; while true; do i=$((i+1)); echo $i | nc -l -p 7000; done","image":"busybox","shell":true,"timeout":300}"#
        )
        let ask = "for t in $(seq 50); do nc 127.0.0.1 7000 </dev/null && exit 0; sleep 0.1; done; exit 1"
        var status: String?
        for _ in 0..<1800 where status != "EXECUTING" {  // once its VM runs (slower beside other guests)
            status = try await server.request("GET", "/v1/operations/\(counter)").json()["status"] as? String
            if status != "EXECUTING" { try await Task.sleep(for: .milliseconds(100)) }
        }
        if status != "EXECUTING" {
            let record = try await server.request("GET", "/v1/operations/\(counter)").text
            Issue.record("the counter instance is \(status ?? "unknown"), not EXECUTING: \(record)")
        }
        let first = try await exec(server, counter, ask)
        try await server.waitForOutput(counter, spid: first, "1\\n")
        // Two subprocesses at once: each has a session of its own.
        let slow = try await exec(server, counter, "sleep 1; echo slow")
        let quick = try await exec(server, counter, "echo quick")
        try await server.waitForOutput(counter, spid: quick, "quick\\n")
        try await server.waitForOutput(counter, spid: slow, "slow\\n")

        let saved = try await server.request(
            "POST", "/x-contree/instances/\(counter)/snapshot", json: #"{"tag":"warm"}"#)
        #expect(saved.status == 201, "\(saved.text)")
        let image = try #require(try saved.json()["uuid"] as? String)
        #expect(try saved.json()["memory"] as? Bool == true)
        #expect(try saved.json()["tag"] as? String == "warm")
        // Two instances resumed from it: each goes on from the same count.
        for _ in 0..<2 {
            let resumed = try await server.request(
                "POST", "/x-contree/images/\(image)/resume",
                json: #"{"command":"\#(ask)","shell":true,"timeout":120}"#)
            #expect(resumed.status == 201, "\(resumed.text)")
            let operation = try #require(try resumed.json()["uuid"] as? String)
            let record = try await server.wait(operation)
            #expect(record["status"] as? String == "SUCCESS", "\(record)")
            #expect(record[path: "metadata.result.stdout.value"] as? String == "2\n", "\(record)")
        }
        // The instance itself is unaffected and still running.
        let after = try await exec(server, counter, ask)
        try await server.waitForOutput(counter, spid: after, "2\\n")
        #expect(try await server.request("DELETE", "/v1/operations/\(counter)").status == 202)
        _ = try await server.wait(counter)

        // Bad cases: an image without memory, an instance that has ended.
        let files = try await server.wait(
            try await server.spawn(
                #"{"command":"echo x > /x","image":"busybox","shell":true,"disposable":false,"timeout":60}"#))
        let filesOnly = try #require(files["result_image_uuid"] as? String, "\(files)")
        let plain = try await server.request(
            "POST", "/x-contree/images/\(filesOnly)/resume", json: #"{"command":"true","timeout":60}"#)
        #expect(plain.status == 400 && plain.text.contains("holds files only"), "\(plain.text)")
        let ended = try await server.request("POST", "/x-contree/instances/\(counter)/snapshot")
        #expect(ended.status == 409 || ended.status == 410, "\(ended.text)")
        try await server.stop()
    }
}

/// The host kernel's release.
private func hostKernelRelease() -> String {
    var names = utsname()
    uname(&names)
    return withUnsafeBytes(of: &names.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
}

/// A tenant names the reference; the server must not become a way to reach what this machine
/// can reach (issue: SSRF through imports, token realms and redirects).
@Suite("serve: imports reach only the operator's registries", .requiresRoot)
struct RegistryAllowlistTests {
    /// A "registry" that answers everything with `status`, extra headers and a body that must
    /// never reach a client.
    static let script = """
        import http.server, sys
        port, status, header = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
        class Answer(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(status)
                if header:
                    name, value = header.split(": ", 1)
                    self.send_header(name, value)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"INTERNAL-SECRET-BODY root:x:0:0")
            def log_message(self, *args):
                pass
        http.server.ThreadingHTTPServer(("127.0.0.1", port), Answer).serve_forever()
        """

    /// Imports from the fake registry on a server that allows only it; returns the error.
    func importError(status: Int, header: String, token: String = TestServer.alice) async throws -> String {
        let upstream = try PythonServer("the fake registry", Self.script, [String(status), header])
        let server = try await TestServer(arguments: ["--registry", "127.0.0.1:\(upstream.port)"])
        let reply = try await server.request(
            "POST", "/v1/images/import", token: token,
            json: #"{"registry":{"url":"docker://127.0.0.1:\#(upstream.port)/lib/box:1"}}"#)
        guard reply.status == 202 else { return try reply.errorMessage() }
        let record = try await server.wait(try #require(try reply.json()["uuid"] as? String))
        #expect(record["status"] as? String == "FAILED")
        return record["error"] as? String ?? ""
    }

    @Test("a registry not on the allowlist is refused before anything is fetched, for imports and spawns")
    func notAllowed() async throws {
        let upstream = try PythonServer("the fake registry", Self.script, ["500", ""])
        let other = freeLoopbackPort()
        let server = try await TestServer(arguments: ["--registry", "127.0.0.1:\(other)"])
        let reply = try await server.request(
            "POST", "/v1/images/import", json: #"{"registry":{"url":"docker://127.0.0.1:\#(upstream.port)/lib/box:1"}}"#
        )
        #expect(reply.status == 403)
        #expect(try reply.errorMessage().contains("127.0.0.1:\(other)"))
        let spawn = try await server.request(
            "POST", "/v1/instances",
            json: #"{"command":"true","image":"docker://127.0.0.1:\#(upstream.port)/lib/box:1"}"#)
        #expect(spawn.status == 403)
        _ = upstream
    }

    @Test("a token without the import permission may not import, and whoami says so")
    func permission() async throws {
        let server = try await TestServer(arguments: ["--registry", "127.0.0.1:1"])
        let whoami = try await server.request("GET", "/v1/whoami", token: TestServer.carol).json()
        #expect(whoami[path: "permissions.import"] as? Bool == false)
        #expect(try await server.request("GET", "/v1/whoami").json()[path: "permissions.import"] as? Bool == true)
        // A server that allows no registry accepts no import, whatever the token says.
        let closed = try await TestServer()
        #expect(try await closed.request("GET", "/v1/whoami").json()[path: "permissions.import"] as? Bool == false)
        for (path, json) in [
            ("/v1/images/import", #"{"registry":{"url":"docker://127.0.0.1:1/lib/box:1"}}"#),
            ("/v1/instances", #"{"command":"true","image":"docker://127.0.0.1:1/lib/box:1"}"#),
        ] {
            let reply = try await server.request("POST", path, token: TestServer.carol, json: json)
            let message = try reply.errorMessage()
            #expect(reply.status == 403 && message.contains("import=1"), "\(path): \(reply.text)")
        }
    }

    @Test("a token realm on another host is not asked")
    func realmElsewhere() async throws {
        let elsewhere = try PythonServer("the token service", Self.script, ["200", ""])
        let error = try await importError(
            status: 401,
            header: #"WWW-Authenticate: Bearer realm="http://127.0.0.1:\#(elsewhere.port)/token",service="x""#)
        #expect(
            error.contains("token service may not be asked") && error.contains("127.0.0.1:\(elsewhere.port)"),
            "\(error)")
    }

    @Test("a redirect to another host is not followed")
    func redirectElsewhere() async throws {
        let elsewhere = try PythonServer("the redirect target", Self.script, ["200", ""])
        let error = try await importError(status: 302, header: "Location: http://127.0.0.1:\(elsewhere.port)/x")
        #expect(error.contains("redirected") && error.contains("127.0.0.1:\(elsewhere.port)"), "\(error)")
    }

    @Test("what the upstream wrote never reaches the client")
    func noUpstreamBody() async throws {
        let error = try await importError(status: 500, header: "")
        #expect(error.contains("500") && !error.contains("INTERNAL-SECRET-BODY"), "\(error)")
    }
}

import FoundationEssentials
import Glibc
import HTTPTypes
import Hummingbird
import ImageFormats
import SystemSupport

extension ServerState {
    /// `GET /v1/inspect/?tag=NAME`: 302 to the image (the clients read only `Location`).
    func findByTag(_ call: APICall) throws -> Response {
        guard let tag = call.param("tag"), !tag.isEmpty else {
            throw APIError(.badRequest, "tag is required: GET /v1/inspect/?tag=NAME")
        }
        let name = tag.hasPrefix("tag:") ? String(tag.dropFirst(4)) : tag
        guard let record = try api.imageForTag(name, namespace: call.namespace) else {
            throw APIError.notFound("no image has the tag '\(name)'; list tagged images with GET /v1/images?tagged=1")
        }
        return APIResponder.redirect(.found, "/v1/inspect/\(record.uuid)/")
    }

    /// `GET /v1/inspect/{uuid}/`: the image's metadata.
    func inspectImage(_ call: APICall, _ uuid: String) throws -> Response {
        let record = try api.visibleImage(uuid, namespace: call.namespace)
        return .json(try api.imageJSON(record, namespace: call.namespace))
    }

    /// Opens an image's merged view and resolves `path` in it (no symlink leaves the image;
    /// `..` cannot climb above its root). - Throws: 404 when missing, 400 when it escapes.
    private func lookup(
        _ call: APICall, _ uuid: String, followFinal: Bool = true
    ) throws -> (
        ImageFilesystem, ImageFilesystem.Node, String
    ) {
        let record = try api.visibleImage(uuid, namespace: call.namespace)
        let path = call.param("path").flatMap { $0.isEmpty ? nil : $0 } ?? "/"
        guard path.hasPrefix("/") else { throw APIError(.badRequest, "path '\(path)' must be absolute") }
        let fs = ImageFilesystem(layersTopFirst: record.layers.reversed().map(api.store.layerPath))
        let node: ImageFilesystem.Node?
        do {
            node = try fs.lookup(path, followFinal: followFinal)
        } catch let error as SandboxError where error.code == .pathEscapes {
            throw APIError(.badRequest, "path '\(path)' leaves the image's root; use a path inside the image")
        }
        guard let node else { throw APIError.notFound("\(path) does not exist in image \(record.uuid)") }
        return (fs, node, path)
    }

    /// `GET`/`HEAD /v1/inspect/{uuid}/download?path=`: a regular file's bytes.
    func download(_ call: APICall, _ uuid: String) throws -> Response {
        let (fs, node, path) = try lookup(call, uuid)
        guard node.isRegular else {
            throw APIError(.unprocessableContent, "\(path) is not a regular file; list a directory with /list")
        }
        var headers = HTTPFields()
        headers[.contentType] = "application/octet-stream"
        headers[.contentLength] = String(node.status.st_size)
        if call.request.method == .head { return Response(status: .ok, headers: headers) }
        let fd = try fs.openFile(node)
        return Response(status: .ok, headers: headers, body: ServerState.streamFile(fd: fd))
    }

    /// A body that streams a file descriptor and closes it.
    static func streamFile(fd: Int32) -> ResponseBody {
        ResponseBody { writer in
            defer { close(fd) }
            var buffer = [UInt8](repeating: 0, count: 1 << 18)
            while true {
                let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { break }
                try await writer.write(ByteBuffer(bytes: buffer[0..<n]))
            }
            try await writer.finish(nil)
        }
    }

    /// `GET`/`HEAD /v1/inspect/{uuid}/archive?path=`: the path and everything below it as tar.
    func archive(_ call: APICall, _ uuid: String) async throws -> Response {
        let (fs, node, _) = try lookup(call, uuid)
        var headers = HTTPFields()
        headers[.contentType] = "application/x-tar"
        if call.request.method == .head { return Response(status: .ok, headers: headers) }
        // Written to a scratch file first: the tar writer is synchronous and the body async. The
        // file has no name once open (tmp/ holds only leases' work; nothing else may clean it up).
        let scratch = api.store.tmpPath + "/archive-" + UUID().uuidString.lowercased() + ".tar"
        let fd = open(scratch, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SandboxError.system("open(\(scratch))") }
        unlink(scratch)
        do {
            try await BlockingPool.shared.run {
                try fs.export(node) { chunk in try FileSystem.writeAll(fd: fd, chunk, path: scratch) }
            }
        } catch {
            close(fd)
            throw error
        }
        lseek(fd, 0, SEEK_SET)
        headers[.contentLength] = String(lseek(fd, 0, SEEK_END))
        lseek(fd, 0, SEEK_SET)
        return Response(status: .ok, headers: headers, body: ServerState.streamFile(fd: fd))
    }

    /// `GET /v1/inspect/{uuid}/list?path=[&text]`: a directory's entries (or the file itself),
    /// as `DirectoryList` JSON or ls-like text.
    func list(_ call: APICall, _ uuid: String) throws -> Response {
        let (fs, node, path) = try lookup(call, uuid)
        let children: [(name: RawPath, node: ImageFilesystem.Node)]
        do {
            children =
                node.isDirectory ? try fs.list(node) : [(node.path.isEmpty ? "/" : node.path.lastComponent, node)]
        } catch {
            throw APIError(.unprocessableContent, "\(path) cannot be listed: \(error)")
        }
        if call.query["text"] != nil && call.param("text") != "0" && call.param("text") != "false" {
            var total: Int64 = 0
            var lines: [String] = []
            for (name, child) in children {
                let st = child.status
                total += Int64(st.st_size)
                let target = child.isSymlink ? " -> " + ((try? fs.readLink(child).description) ?? "") : ""
                lines.append(
                    "\(ServerState.modeString(st.st_mode)) \(st.st_nlink) \(st.st_uid) \(st.st_gid) \(String(st.st_size).leftPadded(10)) \(ServerState.lsTime(st.st_mtim.tv_sec)) \(name.description)\(target)"
                )
            }
            var headers = HTTPFields()
            headers[.contentType] = "text/plain; charset=utf-8"
            let text = "total \(total)\n" + lines.map { $0 + "\n" }.joined()
            return Response(status: .ok, headers: headers, body: .init(byteBuffer: ByteBuffer(string: text)))
        }
        let items = children.map { name, child -> JSON in
            let st = child.status
            let kind = st.st_mode & S_IFMT
            return .object([
                ("size", .int(Int64(st.st_size))), ("path", .string(name.text)),
                ("owner", st.st_uid == 0 ? .string("root") : .null),
                ("group", st.st_gid == 0 ? .string("root") : .null),
                ("uid", .int(Int64(st.st_uid))), ("gid", .int(Int64(st.st_gid))), ("mode", .int(Int64(st.st_mode))),
                ("mtime", .int(Int64(st.st_mtim.tv_sec))), ("nlink", .int(Int64(st.st_nlink))),
                ("is_dir", .bool(kind == S_IFDIR)), ("is_regular", .bool(kind == S_IFREG)),
                ("is_symlink", .bool(kind == S_IFLNK)), ("is_socket", .bool(kind == S_IFSOCK)),
                ("is_fifo", .bool(kind == S_IFIFO)),
                ("symlink_to", .string(kind == S_IFLNK ? ServerState.linkTarget(fs, child) : "")),
            ])
        }
        return .json(.object([("path", .string(path)), ("files", .array(items))]))
    }

    static func linkTarget(_ fs: ImageFilesystem, _ node: ImageFilesystem.Node) -> String {
        (try? fs.readLink(node).text) ?? ""
    }

    static func modeString(_ mode: mode_t) -> String {
        let kind: Character =
            switch mode & S_IFMT {
            case S_IFDIR: "d"
            case S_IFLNK: "l"
            case S_IFCHR: "c"
            case S_IFBLK: "b"
            case S_IFIFO: "p"
            case S_IFSOCK: "s"
            default: "-"
            }
        var text = String(kind)
        let letters: [Character] = ["r", "w", "x"]
        for i in 0..<9 {
            text.append(mode & (1 << (8 - mode_t(i))) != 0 ? letters[i % 3] : "-")
        }
        return text
    }

    static func lsTime(_ seconds: Int) -> String {
        var t = time_t(seconds)
        var parts = tm()
        gmtime_r(&t, &parts)
        let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        let day = String(parts.tm_mday).leftPadded(2)
        let hour = String(parts.tm_hour).leftPadded(2, with: "0")
        let minute = String(parts.tm_min).leftPadded(2, with: "0")
        return "\(months[Int(parts.tm_mon)]) \(day) \(hour):\(minute)"
    }
}

extension String {
    func leftPadded(_ width: Int, with pad: Character = " ") -> String {
        count >= width ? self : String(repeating: pad, count: width - count) + self
    }
}
